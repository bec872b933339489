"""NBD wire format: every constant and struct the client uses, in one place.

Source: the protocol spec, ``doc/proto.md`` of the NetworkBlockDevice/nbd
project.  All integers on the wire are big-endian ("network byte order"),
hence the ``>`` in every format.  Only what this client speaks is here: the
fixed-newstyle handshake (NBD_OPT_GO with NBD_OPT_EXPORT_NAME as fallback,
NBD_OPT_INFO to re-read the size) and simple replies in transmission.
Structured replies are deliberately never negotiated.
"""

from __future__ import annotations

import errno
import struct

# ---- handshake ---------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT": newstyle negotiation
CLISERV_MAGIC = 0x00420281861253       # oldstyle negotiation (not supported)
OPTION_REPLY_MAGIC = 0x3E889045565A9   # prefix of every option reply

# S: u64 NBDMAGIC; u64 IHAVEOPT; u16 handshake flags
SERVER_GREETING = struct.Struct(">QQH")
# handshake flags (server -> client)
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1

# C: u32 client flags
CLIENT_FLAGS = struct.Struct(">I")
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# C: u64 IHAVEOPT; u32 option; u32 length of data; data[length]
OPTION_HEADER = struct.Struct(">QII")
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_INFO = 6
NBD_OPT_GO = 7

# S: u64 OPTION_REPLY_MAGIC; u32 option; u32 reply type; u32 length; data[length]
OPTION_REPLY = struct.Struct(">QIII")
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9

REP_NAMES = {
    NBD_REP_ACK: "NBD_REP_ACK", NBD_REP_SERVER: "NBD_REP_SERVER", NBD_REP_INFO: "NBD_REP_INFO",
    NBD_REP_ERR_UNSUP: "NBD_REP_ERR_UNSUP", NBD_REP_ERR_POLICY: "NBD_REP_ERR_POLICY",
    NBD_REP_ERR_INVALID: "NBD_REP_ERR_INVALID", NBD_REP_ERR_PLATFORM: "NBD_REP_ERR_PLATFORM",
    NBD_REP_ERR_TLS_REQD: "NBD_REP_ERR_TLS_REQD", NBD_REP_ERR_UNKNOWN: "NBD_REP_ERR_UNKNOWN",
    NBD_REP_ERR_SHUTDOWN: "NBD_REP_ERR_SHUTDOWN",
    NBD_REP_ERR_BLOCK_SIZE_REQD: "NBD_REP_ERR_BLOCK_SIZE_REQD", NBD_REP_ERR_TOO_BIG: "NBD_REP_ERR_TOO_BIG",
}

# NBD_OPT_GO / NBD_OPT_INFO data:
#   u32 length of name; name[length]; u16 number of info requests; u16 info[n]
NAME_LENGTH = struct.Struct(">I")
INFO_COUNT = struct.Struct(">H")
INFO_TYPE = struct.Struct(">H")

# NBD_REP_INFO data starts with u16 info type, then per type:
NBD_INFO_EXPORT = 0
# NBD_INFO_EXPORT: u16 type; u64 export size; u16 transmission flags
INFO_EXPORT = struct.Struct(">HQH")
NBD_INFO_BLOCK_SIZE = 3
# NBD_INFO_BLOCK_SIZE: u16 type; u32 minimum; u32 preferred; u32 maximum payload
INFO_BLOCK_SIZE = struct.Struct(">HIII")

# Reply to NBD_OPT_EXPORT_NAME (no option-reply header!):
#   u64 export size; u16 transmission flags; 124 zero bytes unless NO_ZEROES
EXPORT_NAME_REPLY = struct.Struct(">QH")
EXPORT_NAME_PADDING = 124

# transmission flags (per export)
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11

# ---- transmission ------------------------------------------------------------

NBD_REQUEST_MAGIC = 0x25609513
# C: u32 magic; u16 command flags; u16 type; u64 handle (cookie); u64 offset; u32 length
#    then length bytes of data for NBD_CMD_WRITE
REQUEST = struct.Struct(">IHHQQI")

NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF  # only to name it in an error message
# S: u32 magic; u32 error; u64 handle; then length bytes for a successful NBD_CMD_READ
SIMPLE_REPLY = struct.Struct(">IIQ")

NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6

CMD_NAMES = {
    NBD_CMD_READ: "READ", NBD_CMD_WRITE: "WRITE", NBD_CMD_DISC: "DISC", NBD_CMD_FLUSH: "FLUSH",
    NBD_CMD_TRIM: "TRIM", NBD_CMD_CACHE: "CACHE", NBD_CMD_WRITE_ZEROES: "WRITE_ZEROES",
}

# command flags
NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1

# Error values in replies.  The spec fixes these numbers (they are Linux's);
# map them explicitly so a non-Linux host would still report the right one.
NBD_ERRNO = {
    1: errno.EPERM,
    5: errno.EIO,
    12: errno.ENOMEM,
    22: errno.EINVAL,
    28: errno.ENOSPC,
    75: errno.EOVERFLOW,
    95: errno.EOPNOTSUPP,
    108: errno.ESHUTDOWN,
}
NBD_ESHUTDOWN = 108
NBD_ENOTSUP = 95

NBD_DEFAULT_PORT = 10809
