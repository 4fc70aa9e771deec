"""gRPC glue shared by every service: the tensor codec and the server bootstrap. Transports stay thin.

gRPC's fork support is turned off here, before any channel or server starts gRPC in the process. With it on,
gRPC stops its threads before every fork and starts them again in the parent and in the child. Ray starts its
GCS, raylet and helpers by fork + exec with a preexec function, so those handlers run, and each child runs
gRPC's threads (six on two cores) over its parent's sockets until it execs. In the router, which holds
channels to the KV cache and the attention workers when it starts a local Ray, that start sometimes timed
out: the GCS or the raylet never wrote a line. We fork only to exec, so the handlers have nothing to keep. A
value set in the environment wins.
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
