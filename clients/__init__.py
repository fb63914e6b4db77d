"""budgetd's clients: a typed gRPC client (grpc_client) and the HTTP bridge (bridge)."""
