"""Generated protobuf / gRPC code for protos/coinfer/v1 (make protos). Do not edit."""
