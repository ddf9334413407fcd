"""KV transfer service: moves a request's KV blocks from a prefill worker into the blocks a decode
worker reserved for it (steps 3-4 of a request's life: reserve, then prefill and push). It moves
blocks and nothing else; it imports nothing from the engine, the workers or the router.

Roles: the decode worker owns a `KVReceiver` (its KV cache is the landing zone) and issues a
`TransferTicket` per request; the prefill worker owns a `KVSender` and pushes chunks (a range of
the ticket's blocks, all layers; or one layer of them on GPU) then says done. Backends, chosen by
name in `create_sender` / `create_receiver`: "torch_dist" (gloo on CPU, NCCL on CUDA), "shm"
(same host), "cuda_ipc" (same node). Both sides connect when the workers start; the handshake
refuses peers whose `KVLayout` differs (`KVLayoutMismatch` names the fields).

Decode worker (receiver) and prefill worker (sender), one request:

    layout = KVLayout("smollm2-135m", "bfloat16", block_size=16, num_layers=30, num_kv_heads=3, head_dim=64)
    rx = create_receiver("shm", layout, num_blocks=4096)       # decode start; cache = rx.kv_cache
    tx = create_sender("shm", layout); tx.connect(rx.endpoint)  # prefill start (endpoint via registry)
    leases = LeaseTable(on_expire=free_blocks_of_lease)          # decode: frees blocks of dead peers
    ticket = rx.issue_ticket("req-1", block_ids=[7, 3, 9], num_tokens=40, lease_id="lease-1")
    leases.grant(ticket.lease_id, ttl_s=10.0)                   # renewed while prefill is alive
    # ... ticket travels to the prefill worker, which computes KV into its own blocks [0, 1, 2] ...
    tx.send_blocks(ticket, gather_blocks(prefill_cache, [0, 1]), start=0)   # first chunk
    tx.send_blocks(ticket, gather_blocks(prefill_cache, [2]), start=2)      # second chunk
    tx.send_done(ticket)
    rx.wait("req-1", timeout_s=5.0)   # DONE; raises TransferError / TransferTimeout otherwise
    leases.release(ticket.lease_id); rx.release("req-1")        # blocks now belong to the engine
"""
from kv_transfer.auto import ReceiverSet, SenderSet, choose_backend
from kv_transfer.blocks import gather_blocks, scatter_blocks
from kv_transfer.counters import CountersSnapshot, TransferCounters
from kv_transfer.errors import KVLayoutMismatch, TransferError, TransferTimeout
from kv_transfer.layout import KVLayout, check_layouts
from kv_transfer.lease import LeaseTable
from kv_transfer.receiver import KVReceiver
from kv_transfer.registry import BACKENDS, create_receiver, create_sender
from kv_transfer.sender import KVSender
from kv_transfer.ticket import TransferState, TransferTicket

__all__ = [
    "BACKENDS",
    "CountersSnapshot",
    "KVLayout",
    "KVLayoutMismatch",
    "KVReceiver",
    "KVSender",
    "ReceiverSet",
    "SenderSet",
    "LeaseTable",
    "TransferCounters",
    "TransferError",
    "TransferState",
    "TransferTicket",
    "TransferTimeout",
    "check_layouts",
    "choose_backend",
    "create_receiver",
    "create_sender",
    "gather_blocks",
    "scatter_blocks",
]
