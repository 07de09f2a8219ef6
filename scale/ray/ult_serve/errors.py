"""Typed errors of ult_serve: what failed, on which ult node, and whether the request may be retried."""

from __future__ import annotations


class UltServeError(Exception):
    """Base class of every error ult_serve raises on purpose."""


class UltdUnavailable(UltServeError):
    """A node's ultd could not be reached, or dropped the connection, while serving a request.

    `sent_chunks` is how many body chunks of the response had already been relayed out of the replica
    when it failed: 0 means nothing reached the client and the request can be retried on another node.
    The constructor's arguments are kept in `args` so that the error pickles through Ray unchanged.
    """

    def __init__(self, node: str, detail: str, sent_chunks: int = 0):
        super().__init__(node, detail, sent_chunks)
        self.node = node
        self.detail = detail
        self.sent_chunks = sent_chunks

    def __str__(self) -> str:
        where = f" after {self.sent_chunks} chunks had been sent" if self.sent_chunks else ""
        return f"ult node {self.node}: ultd unavailable{where}: {self.detail}"


class NodeIdentityError(UltServeError):
    """A replica could not work out which ult node it runs on, or that node's ultd endpoints."""


class ProtoError(UltServeError):
    """ult's gRPC stubs could not be generated from proto/ult/v1/ult.proto."""
