/* Version of the native ABI, checked by vdev._native at import. */
#ifndef VDEV_ABI_H
#define VDEV_ABI_H
int vd_abi_version(void);
#endif
