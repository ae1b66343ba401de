"""R&B data mixing under FSDP2 (``fully_shard``): parameters are sharded DTensors, unsharded
around each forward/backward; the tracker on the LM head sees the unsharded weight.

    torchrun --nproc_per_node 2 examples/fsdp2.py [--tiny] [--mode sketch] [--fused-ce]

Build the tracker (here: the Balancer) after ``fully_shard``: its buffers get the head's
full logical shape on the right device when the first forward shows the unsharded weight.
Memory per rank: exact ``(m + 1) · V · H · 4`` bytes, sketch ``(m + 1) · sketch_dim · 4``
(``docs/distributed.md``). With ``--fused-ce`` the head stays in the root's FSDP group, so its
weight is unsharded when the root's forward calls the fused loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from common import (
    TinyLM,
    init_distributed,
    make_balancer,
    parse_args,
    report,
    shutdown,
    train,
)
from torch.distributed.fsdp import fully_shard


def main() -> None:
    args = parse_args(__doc__)
    device = init_distributed()
    torch.manual_seed(0)
    model = TinyLM(args.vocab, args.hidden, args.layers).to(device)
    for block in model.blocks:
        fully_shard(block)
    if not args.fused_ce:
        fully_shard(model.lm_head)
    fully_shard(model)
    balancer = make_balancer(model, args)
    if args.fused_ce:
        model.fused_ce = balancer.tracker
    result = train(model, balancer, args, device, dist.get_rank(), dist.get_world_size())
    result["setting"] = "fsdp2"
    report(result, args)
    balancer.close()


if __name__ == "__main__":
    main()
    shutdown()
