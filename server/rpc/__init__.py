"""Thin gRPC servicers: they authenticate, translate messages and call the domain modules."""
