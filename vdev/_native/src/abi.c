#include "abi.h"

int vd_abi_version(void) { return 3; }
