"""Protobuf packages of the ``pdserve`` API, one sub-package per version."""
