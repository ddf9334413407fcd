"""Admission (step 1 of a request's life, after validation): a request that no decode worker can
take yet waits here, in priority then arrival order, until one has a free sequence slot and the
KV blocks for it. Only a full queue refuses a request."""
from router.admission.queue import AdmissionQueue, QueuedRequest

__all__ = ["AdmissionQueue", "QueuedRequest"]
