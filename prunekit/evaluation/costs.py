"""Cost accounting: decoder and whole-forward MACs per token, dense and kept (the adapters'
analytic cost model, taken before pruning)."""

from __future__ import annotations

from prunekit.components import ModelAdapter


def structure_reduction(
    adapter: ModelAdapter,
    structure: list[dict] | None,
    seq_len: int,
    head_macs_per_token: float | None = None,
) -> dict:
    """Decoder-layer MACs per token, dense and with the kept structure (the adapter's analytic
    cost model; ``adapter`` must be the one taken before pruning).

    With ``head_macs_per_token`` (the LM head's, :func:`head_macs`), also the whole forward's:
    ``forward_flops_kept_fraction`` bounds the speed-up pruning can give
    (:func:`prunekit.evaluation.runtime.flop_limit`). Embedding lookups and norms are not MACs.
    """
    layers = adapter.layers()
    dense = sum(la.macs_per_token(la.num_heads, la.intermediate_size, seq_len) for la in layers)
    if not structure:
        structure = [{"heads": la.num_heads, "channels": la.intermediate_size} for la in layers]
    kept = sum(  # a removed block (depth pruning, ``"removed": true``) costs nothing
        0.0 if row.get("removed") else la.macs_per_token(row["heads"], row["channels"], seq_len)
        for la, row in zip(layers, structure, strict=True)
    )
    out = {
        "decoder_macs_per_token_dense": dense,
        "decoder_macs_per_token": kept,
        "flops_kept_fraction": kept / dense,
        "flops_removed_fraction": 1 - kept / dense,
        "seq_len": seq_len,
    }
    if head_macs_per_token is not None:
        out["head_macs_per_token"] = head_macs_per_token
        out["forward_flops_kept_fraction"] = (kept + head_macs_per_token) / (
            dense + head_macs_per_token
        )
    return out


def head_macs(model) -> float:
    """MACs per token of the LM head (the output embedding's weight), 0 without one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    return float(weight.numel()) if weight is not None else 0.0
