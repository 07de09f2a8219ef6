"""ult_serve: ult nodes behind Ray Serve, each request routed to a node where its model is resident."""

from .errors import NodeIdentityError, ProtoError, UltdUnavailable, UltServeError

__all__ = ["NodeIdentityError", "ProtoError", "UltdUnavailable", "UltServeError"]
