"""gRPC glue shared by every service: the tensor codec and the server bootstrap. Transports stay thin."""
