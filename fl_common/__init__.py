"""Code shared by the factory and the operator: the wire protocol and small helpers."""
