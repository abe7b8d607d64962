"""resserve.serve: the torch-free side of resserve (CLI root, and later the gRPC server)."""
