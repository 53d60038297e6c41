"""Generated protobuf and gRPC code; do not edit (scripts/gen_protos.py)."""
