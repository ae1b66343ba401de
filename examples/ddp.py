"""R&B data mixing under DDP: the tracker on the LM head, statistics all-reduced each round.

    torchrun --nproc_per_node 2 examples/ddp.py [--tiny] [--mode sketch] [--fused-ce]

Every rank trains on its own samples (the MixtureSampler gives each rank its stream); each
round the Balancer all-reduces the per-domain statistics, updates the mixture identically on
every rank (checked), and the sampler follows it.
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
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    args = parse_args(__doc__)
    device = init_distributed()
    torch.manual_seed(0)
    model = TinyLM(args.vocab, args.hidden, args.layers).to(device)
    ddp = DistributedDataParallel(model)
    balancer = make_balancer(ddp, args)
    if args.fused_ce:
        model.fused_ce = balancer.tracker
    result = train(ddp, balancer, args, device, dist.get_rank(), dist.get_world_size())
    result["setting"] = "ddp"
    report(result, args)
    balancer.close()


if __name__ == "__main__":
    main()
    shutdown()
