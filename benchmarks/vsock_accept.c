/* Guest side of the connection-setup measurement in vsock_throughput.py:
 * listen on a vsock port, accept COUNT connections and close each at once,
 * with no fork or exec per connection (socat's fork would measure the
 * guest's process creation instead of the device).  Built static on the
 * host and copied into the guest.
 *
 *     vsock-accept PORT COUNT
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

int main(int argc, char **argv)
{
    struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY };
    long count, done = 0;
    int fd;

    if (argc != 3) {
        fprintf(stderr, "usage: vsock-accept PORT COUNT\n");
        return 2;
    }
    addr.svm_port = (unsigned int)strtoul(argv[1], NULL, 10);
    count = strtol(argv[2], NULL, 10);
    fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(fd, 128) < 0) {
        perror("vsock-accept");
        return 1;
    }
    printf("listening\n");
    fflush(stdout);
    while (done < count) {
        int c = accept(fd, NULL, NULL);
        if (c < 0) {
            perror("accept");
            return 1;
        }
        close(c);
        done++;
    }
    printf("accepted=%ld\n", done);
    return 0;
}
