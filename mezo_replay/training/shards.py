"""Where a rank's shard of a parameter sits in the whole tensor, and the whole tensor's fingerprint from
shards streamed to one rank: what sharded MeZO (FSDP2, `fully_shard`) needs besides the element passes.

Why this is enough: FSDP2 shards every parameter on dim 0 (Shard(0) over a 1-D mesh, torch.chunk's
split: ceil-sized row blocks, the last ones short or empty), so a rank's local tensor is a contiguous run
of the row-major elements starting at r0 * row size. The noise is keyed by element index, so the passes
of kernels/steps.py given that start write exactly the bytes a single device would, and a sharded run
rebuilds on one CPU. Fingerprints are streams over the row-major words, so rank 0 can hash the shards as
they arrive, one bounded slice at a time, and no rank ever holds a whole model.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..errors import MezoReplayError
from ..format.fingerprint import ShardedFingerprint, tensor_fingerprint

_MESSAGE_BYTES = 4 << 20  # one send of a shard's bytes: bounded memory on rank 0 whatever the tensor size


def chunk_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [r0, r1) that coordinate `rank` of `world` holds under torch.chunk on dim 0 (FSDP2's Shard(0))."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    size = -(-rows // world)
    return min(rows, rank * size), min(rows, (rank + 1) * size)


def _dtensor_layout(param: torch.Tensor):
    """(mesh, coordinate) of a DTensor sharded Shard(0) over a 1-D mesh; None for a plain tensor or one
    replicated everywhere (its local tensor is the whole). Anything else fails: its elements are not one
    contiguous run, and the passes would draw the wrong noise."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(param, DTensor):
        return None
    mesh, placements = param.device_mesh, param.placements
    if all(isinstance(p, Replicate) for p in placements):
        return None
    if mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"a sharded parameter must be Shard(0) over a 1-D device mesh (FSDP2's layout), "
                         f"not {tuple(placements)} over a {mesh.ndim}-D mesh")
    return mesh, mesh.get_local_rank()


def local_shard_offset(param: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(start, local): this rank's local tensor of `param` and the row-major index, in the whole tensor, of
    its first element; the element passes take start (steps.perturb_all_(..., starts=...)). local is the
    DTensor's own storage (FSDP2's sharded parameter), so passes applied to it change the parameter. A
    plain tensor is its own whole: (0, param)."""
    layout = _dtensor_layout(param)
    if layout is None:
        return 0, (param.to_local() if hasattr(param, "to_local") else param)
    mesh, coordinate = layout
    local = param.to_local()
    rows = param.shape[0] if param.dim() else 1
    r0, r1 = chunk_rows(rows, mesh.size(), coordinate)
    if local.shape[0] != r1 - r0 or tuple(local.shape[1:]) != tuple(param.shape[1:]):
        raise ValueError(f"local shard {tuple(local.shape)} of {tuple(param.shape)} is not torch.chunk's rows "
                         f"{r0}..{r1} for coordinate {coordinate} of {mesh.size()}: uneven sharding is not supported")
    if not local.is_contiguous():
        raise ValueError("a sharded parameter's local tensor must be contiguous")
    return r0 * math.prod(param.shape[1:]), local


def sharded_fingerprint(param: torch.Tensor) -> str | None:
    """tensor_fingerprint of the whole `param`, computed on mesh coordinate 0 (which returns it; the others
    return None) from every coordinate's shard sent to it in order, in slices of at most 4 MiB: no rank
    holds more than its shard and one slice. Every rank of the mesh must call it (a collective). A plain or
    replicated tensor is fingerprinted where it is, on every rank. The slices travel on the device the
    group's backend carries (nccl: this rank's GPU, even for shards offloaded to the CPU; gloo: the CPU)."""
    layout = _dtensor_layout(param)
    if layout is None:
        return tensor_fingerprint(param.to_local() if hasattr(param, "to_local") else param)
    mesh, coordinate = layout
    group = mesh.get_group()
    world = mesh.size()
    _, local = local_shard_offset(param)
    row = math.prod(param.shape[1:])
    width = local.element_size()
    per_message = max(1, _MESSAGE_BYTES // width)
    nccl = dist.get_backend(group) == "nccl"
    wire = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    if coordinate != 0:
        data = local.detach().reshape(-1).view(torch.uint8)  # bytes: every backend carries uint8
        for i in range(0, local.numel(), per_message):
            dist.send(data[i * width:(i + per_message) * width].to(wire).contiguous(),
                      dst=dist.get_global_rank(group, 0), group=group)
        return None
    fp = ShardedFingerprint(param.dtype, param.shape)
    fp.update(local)
    for source in range(1, world):
        r0, r1 = chunk_rows(param.shape[0], world, source)
        n = (r1 - r0) * row
        for i in range(0, n, per_message):
            buffer = torch.empty(min(per_message, n - i) * width, dtype=torch.uint8, device=wire)
            dist.recv(buffer, src=dist.get_global_rank(group, source), group=group)
            fp.update(buffer.cpu().numpy())
    return fp.hexdigest()


def is_dtensor(param: torch.Tensor) -> bool:
    """Whether `param` is a DTensor (an FSDP2 parameter, sharded or replicated)."""
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def fingerprints(params: list[torch.Tensor]) -> list[str]:
    """tensor_fingerprint of each whole parameter, on every rank: sharded_fingerprint streams the shards to
    mesh coordinate 0, which then broadcasts the list (a few hundred bytes), so every rank can write or
    compare a header while no rank ever held more than its shards. Every rank must call it (collectives)."""
    found = [sharded_fingerprint(p) for p in params]
    meshes = [p.device_mesh for p in params if is_dtensor(p)]
    if not meshes or not dist.is_initialized():
        return [fp for fp in found if fp is not None]
    group = meshes[0].get_group()
    box = [found if meshes[0].get_local_rank() == 0 else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    out = box[0]
    assert out is not None and all(isinstance(fp, str) for fp in out)
    return out


def shard_model(model: torch.nn.Module, device: str, offload: bool = False) -> torch.nn.Module:
    """FSDP2 over every process of the default group: fully_shard on each block the model names as not to
    be split (`_no_split_modules`: a decoder layer), then on the root, which takes the rest (embeddings,
    tied head, final norm; a tied weight stays one parameter). Parameters are resharded after every forward,
    the root's too (FSDP2 keeps the root's gathered by default, for a backward MeZO never runs): between
    forwards every parameter is its shard, and the passes over the shards are what the next forward sees.
    offload: FSDP2's CPUOffloadPolicy, shards kept in host memory and gathered onto the device per layer."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    kind = torch.device(device).type
    if kind == "cpu" or offload:
        _return_freed_memory()
    mesh = init_device_mesh(kind, (dist.get_world_size(),))
    options: dict = {"mesh": mesh, "reshard_after_forward": True}
    if offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=kind == "cuda")
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, **options)
    fully_shard(model, **options)
    for name, p in model.named_parameters():
        try:
            local_shard_offset(p)  # the layout every pass relies on, checked once here
        except ValueError as e:
            raise MezoReplayError(f"--shard: {name}: {e}") from None
    return model


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _return_freed_memory() -> None:
    """Makes glibc serve blocks of 1 MiB and more from their own mappings, returned to the system when freed.

    Why: FSDP2 gathers a layer, runs it and frees it, layer after layer. glibc's default raises its mmap
    threshold to the size of each large block freed, so the next gathers come from the heap, which it keeps:
    on a 94M-parameter Llama over 2 CPU ranks the heap held 270 MiB more after one forward (1.5x the rank's
    shard), and a rank's memory no longer fell as 1/N. A fixed threshold keeps it at the shard plus what is
    in use. Not glibc (or no libc found): nothing to do."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass
