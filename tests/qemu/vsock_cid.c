/* Prints the guest's own vsock CID as the kernel knows it (read from the
 * device's config space, guest_cid, when the driver probed):
 * IOCTL_VM_SOCKETS_GET_LOCAL_CID on /dev/vsock.  Built static by
 * tests/qemu/test_vsock.py and copied into the guest, whose busybox has no
 * way to ask. */
#include <fcntl.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <linux/vm_sockets.h>

int main(void)
{
    unsigned int cid = 0;
    int fd = open("/dev/vsock", O_RDONLY);

    if (fd < 0 || ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) < 0) {
        perror("vsock-cid");
        return 1;
    }
    printf("cid=%u\n", cid);
    return 0;
}
