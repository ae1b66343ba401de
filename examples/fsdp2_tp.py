"""R&B data mixing with FSDP2 over data-parallel ranks and a vocabulary-parallel LM head
(``ColwiseParallel``) over tensor-parallel ranks, on a 2-D DeviceMesh ``(dp, tp)``.

    torchrun --nproc_per_node 4 examples/fsdp2_tp.py --tp 2   # dp = 2, tp = 2
    torchrun --nproc_per_node 2 examples/fsdp2_tp.py --tiny   # dp = 1, tp = 2 (CI)

Each tensor-parallel rank holds ``V / tp`` rows of the head and sees only its shard of ``dy``:
exact mode keeps ``(m + 1) · (V / tp) · H`` floats per rank and sums the ranks' partial Grams
over the TP group; sketch mode hashes rows by global index, so the shards' sketches add up to
the full one. Ranks of one TP group see the same data, so the tracker is told which ranks hold
different data (``dp_group``), and the sampler draws per data-parallel rank.
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
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module


def main() -> None:
    import sys

    tp = 0
    if "--tp" in sys.argv:
        i = sys.argv.index("--tp")
        tp = int(sys.argv[i + 1])
        del sys.argv[i : i + 2]
    args = parse_args(__doc__)
    device = init_distributed()
    world = dist.get_world_size()
    tp = tp or world
    if world % tp:
        raise SystemExit(f"--tp {tp} must divide the world size {world}")
    mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = TinyLM(args.vocab, args.hidden, args.layers).to(device)
    # The head's logits are gathered (Replicate) so any loss works; each rank's backward still
    # only sees its vocabulary shard of dy.
    parallelize_module(model, mesh["tp"], {"lm_head": ColwiseParallel(output_layouts=Replicate())})
    for block in model.blocks:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model.lm_head, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    balancer = make_balancer(model, args, dp_group=mesh["dp"])
    dp_rank = mesh.get_local_rank("dp")
    result = train(model, balancer, args, device, dp_rank, world // tp)
    result["setting"] = f"fsdp2+tp (dp={world // tp}, tp={tp})"
    report(result, args)
    balancer.close()


if __name__ == "__main__":
    main()
    shutdown()
