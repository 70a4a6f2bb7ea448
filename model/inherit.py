"""A student that starts from its teacher instead of from random weights.

The seed paper factors each Delta projection as W ~ U V^T (its Eq. 5) but does not say where U and V
come from. For a student of the same family as its teacher this module makes them concrete, and
fills every other weight from the teacher too:

- residual-stream channels (C): one choice for the whole network, so that every conv, LayerNorm,
  mixer projection and the upsampler's input keep the same channels and still line up;
- each mixer's inner channels (E = expand * C): a choice per layer; its conv taps and D follow;
- the Delta path: the teacher's E x E product ``dt_proj.weight @ x_proj.weight[:r]`` restricted to
  the chosen inner channels, factored at the student's rank by a truncated SVD, which is the best
  rank-r approximation (Eckart-Young): its error is the tail of the singular values;
- SSM states (N): those whose B and C rows weigh most;
- fewer groups or blocks: evenly spaced ones, the first and the last kept. The first sees the first
  conv's features as the teacher's did, and the last feeds the final LayerNorm and conv, which are
  inherited unchanged; the spacing keeps the teacher's progression from early to late features;
- a d_conv below the teacher's: the most recent taps (the causal conv's last ones).

Which channels and states are kept is decided by a ``criterion``: ``weights`` (norms of the weights
that read and write them; needs no data) or ``activations`` (their energy on a few calibration LR
patches, weighted by the norm of the weights that read them out).

Any embed dim up to the teacher's, any rank, fewer groups or blocks and a smaller d_state inherit;
the student's topology switches (``embed_norm``, ``block_residual``) may differ from the teacher's
(a LayerNorm the teacher lacks starts with weight 1 and bias 0). A student wider than its teacher in any
dimension, or of another scale, is refused with one sentence naming the dimension.
"""

from __future__ import annotations

import torch

from edge_agent.errors import UsageError
from model.mambalitesr import MambaLiteSR, MambaMixer, ModelConfig

CRITERIA = ("weights", "activations")
# activations: chosen on a held-out split of the training photos (docs/benchmarks.md: 2.5 dB more
# of the teacher's function kept at step 0, and no worse after 200 steps); weights needs no data
DEFAULT_CRITERION = "activations"
# The switches that make a network's topology rather than its size: DVMSR's LayerNorm after the
# first conv, and its blocks without their own residual (model/mambalitesr.py).
TOPOLOGY = ("embed_norm", "block_residual")
SINGULAR_FLOOR = 1e-6  # singular values below this fraction of the largest carry no direction


def in_teacher_topology(student: ModelConfig, teacher: ModelConfig) -> ModelConfig:
    """``student`` with its teacher's topology switches. A student that inherits keeps more of
    its teacher's function in the teacher's own topology than in the seed paper's, and learns
    faster from there (docs/benchmarks.md), so that is where training puts it by default."""
    return student.replace(**{name: getattr(teacher, name) for name in TOPOLOGY})


class InheritError(UsageError, ValueError):
    """A student that cannot inherit from this teacher; the message names the dimension."""


def compatibility_problem(teacher: ModelConfig, student: ModelConfig) -> str | None:
    """Why ``student`` cannot inherit from ``teacher`` (one sentence), or None."""
    if student.scale != teacher.scale:
        return (
            f"the student upscales x{student.scale} and the teacher x{teacher.scale}; a student "
            "inherits only at its teacher's scale"
        )
    for name, label in (
        ("embed_dim", "embed dim"),
        ("inner_dim", "inner width (expand x embed dim)"),
        ("n_groups", "number of groups"),
        ("blocks_per_group", "blocks per group"),
        ("d_state", "d_state"),
        ("d_conv", "d_conv"),
    ):
        s, t = getattr(student, name), getattr(teacher, name)
        if s > t:
            return f"the student's {label} is {s}, wider than the teacher's {t}; give it at most {t}"
    return None


def evenly_spaced(n: int, m: int) -> list[int]:
    """``m`` of ``range(n)``, evenly spaced, the first and (for m > 1) the last among them."""
    if m == 1:
        return [0]
    return sorted({round(i * (n - 1) / (m - 1)) for i in range(m)})


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in ascending index order (ties: the lower index)."""
    order = torch.argsort(-scores.double(), stable=True)
    return torch.sort(order[:k]).values


def delta_factor(product: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The best rank-``rank`` factor of a square ``product`` (E x E): (U sqrt(S), sqrt(S) V^T, k),
    shapes (E x rank) and (rank x E). k is how many singular values carry a direction (above
    SINGULAR_FLOOR of the largest); the components past k are left zero."""
    u, s, vh = torch.linalg.svd(product.double())
    e = product.shape[0]
    k = int((s > SINGULAR_FLOOR * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    k = min(k, rank)
    left = torch.zeros(e, rank, dtype=torch.float64)
    right = torch.zeros(rank, e, dtype=torch.float64)
    root = s[:k].sqrt()
    left[:, :k] = u[:, :k] * root
    right[:k] = root[:, None] * vh[:k]
    return left.float(), right.float(), k


def _mixers(net: MambaLiteSR) -> list[list[MambaMixer]]:
    return [[block.mixer for block in group.blocks] for group in net.groups]


@torch.no_grad()
def _activation_energy(teacher: MambaLiteSR, calibration: torch.Tensor):
    """Per residual channel: mean squared feature over the first conv's output and every group's
    output; per mixer: mean squared input of out_proj per inner channel."""
    residual = torch.zeros(teacher.cfg.embed_dim, dtype=torch.float64)
    inner: dict[int, torch.Tensor] = {}
    hooks = []

    def on_residual(_module, _inputs, out):
        residual.add_(out.double().pow(2).mean(dim=(0, 2, 3)).cpu())

    def on_inner(key):
        def hook(_module, inputs):
            inner[key] = inputs[0].double().pow(2).mean(dim=(0, 1)).cpu()

        return hook

    hooks.append(teacher.conv_first.register_forward_hook(on_residual))
    for group in teacher.groups:
        hooks.append(group.register_forward_hook(on_residual))
    for mixer in (m for layer in _mixers(teacher) for m in layer):
        hooks.append(mixer.out_proj.register_forward_pre_hook(on_inner(id(mixer))))
    try:
        teacher.eval()(calibration)
    finally:
        for h in hooks:
            h.remove()
    return residual, inner


def inherit(
    teacher: MambaLiteSR,
    student: ModelConfig,
    criterion: str = DEFAULT_CRITERION,
    calibration: torch.Tensor | None = None,
    seed: int = 0,
) -> MambaLiteSR:
    """A ``student`` network whose weights come from ``teacher`` (see the module docstring).

    Args:
        criterion: ``weights`` or ``activations``; the latter needs ``calibration``, a batch of LR
            patches (B, 3, h, w) in [0, 1].
        seed: for the few weights the teacher has no counterpart of (Delta components past the
            teacher's rank, a LayerNorm the teacher lacks); the result is the same for the same
            arguments.

    Raises:
        InheritError: the student is wider than the teacher in some dimension, or of another scale.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    t_cfg = teacher.cfg
    problem = compatibility_problem(t_cfg, student)
    if problem:
        raise InheritError(problem)
    if criterion == "activations" and calibration is None:
        raise ValueError("the activations criterion needs calibration patches")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = MambaLiteSR(student)
    energy = _activation_energy(teacher, calibration) if criterion == "activations" else None
    tw = {k: v.detach().cpu().clone() for k, v in teacher.state_dict().items()}
    new = net.state_dict()

    # residual-stream channels, one choice for the network
    if energy is not None:
        score_c = energy[0]
    else:
        score_c = tw["conv_first.weight"].flatten(1).norm(dim=1)
    c = top(score_c, student.embed_dim)

    new["conv_first.weight"] = tw["conv_first.weight"][c]
    new["conv_first.bias"] = tw["conv_first.bias"][c]
    if net.embed_norm is not None and teacher.embed_norm is not None:
        new["embed_norm.weight"] = tw["embed_norm.weight"][c]
        new["embed_norm.bias"] = tw["embed_norm.bias"][c]  # one the teacher lacks: weight 1, bias 0
    for name in ("norm.weight", "norm.bias", "conv_after_body.bias"):
        new[name] = tw[name][c]
    new["conv_after_body.weight"] = tw["conv_after_body.weight"][c][:, c]
    new["upsample.0.weight"] = tw["upsample.0.weight"][:, c]
    new["upsample.0.bias"] = tw["upsample.0.bias"]

    groups = evenly_spaced(t_cfg.n_groups, student.n_groups)
    blocks = evenly_spaced(t_cfg.blocks_per_group, student.blocks_per_group)
    t_mixers = _mixers(teacher)
    for gs, gt in enumerate(groups):
        new[f"groups.{gs}.conv.weight"] = tw[f"groups.{gt}.conv.weight"][c][:, c]
        new[f"groups.{gs}.conv.bias"] = tw[f"groups.{gt}.conv.bias"][c]
        for bs, bt in enumerate(blocks):
            src, dst = f"groups.{gt}.blocks.{bt}", f"groups.{gs}.blocks.{bs}"
            new[f"{dst}.norm.weight"] = tw[f"{src}.norm.weight"][c]
            new[f"{dst}.norm.bias"] = tw[f"{src}.norm.bias"][c]
            inner = energy[1][id(t_mixers[gt][bt])] if energy is not None else None
            _inherit_mixer(tw, new, f"{src}.mixer", f"{dst}.mixer", t_cfg, student, c, inner)
    net.load_state_dict(new)
    return net


def _inherit_mixer(
    tw, new, src: str, dst: str, t_cfg: ModelConfig, s_cfg: ModelConfig, c, inner_energy
) -> None:
    """One mixer's weights: its inner channels, states and Delta factor from the teacher's."""
    e_t, r_t, n_t = t_cfg.inner_dim, t_cfg.rank, t_cfg.d_state
    in_proj, out_proj, x_proj = (
        tw[f"{src}.in_proj.weight"],
        tw[f"{src}.out_proj.weight"],
        tw[f"{src}.x_proj.weight"],
    )
    readout = out_proj.norm(dim=0)  # how much each inner channel writes back
    if inner_energy is None:
        score_e = readout * in_proj[:e_t].norm(dim=1)
    else:
        score_e = inner_energy * readout.double().pow(2)
    e = top(score_e, s_cfg.inner_dim)

    new[f"{dst}.in_proj.weight"] = torch.cat([in_proj[:e_t][e][:, c], in_proj[e_t:][e][:, c]])
    new[f"{dst}.out_proj.weight"] = out_proj[c][:, e]
    new[f"{dst}.conv1d.weight"] = tw[f"{src}.conv1d.weight"][e][:, :, t_cfg.d_conv - s_cfg.d_conv :]
    new[f"{dst}.conv1d.bias"] = tw[f"{src}.conv1d.bias"][e]
    new[f"{dst}.D"] = tw[f"{src}.D"][e]
    new[f"{dst}.dt_proj.bias"] = tw[f"{src}.dt_proj.bias"][e]

    b_rows, c_rows = x_proj[r_t : r_t + n_t][:, e], x_proj[r_t + n_t :][:, e]
    n = top(b_rows.norm(dim=1) * c_rows.norm(dim=1), s_cfg.d_state)
    new[f"{dst}.A_log"] = tw[f"{src}.A_log"][e][:, n]

    dt_weight = tw[f"{src}.dt_proj.weight"]  # (E_t x r_t)
    if len(e) == e_t and s_cfg.rank == r_t:  # the teacher's own factors: already the best rank-r_t
        left, right, k = dt_weight, x_proj[:r_t], r_t
    else:
        product = dt_weight @ x_proj[:r_t]  # (E_t x E_t): x -> Delta's pre-activation
        left, right, k = delta_factor(product[e][:, e], s_cfg.rank)
    # components the teacher's product lacks keep the student's random dt_proj columns and start
    # with zero x_proj rows: Delta is the teacher's at step 0, and they still receive gradients
    left = torch.where(torch.arange(s_cfg.rank) < k, left, new[f"{dst}.dt_proj.weight"])
    new[f"{dst}.dt_proj.weight"] = left
    new[f"{dst}.x_proj.weight"] = torch.cat([right, b_rows[n], c_rows[n]])


__all__ = [
    "CRITERIA",
    "DEFAULT_CRITERION",
    "TOPOLOGY",
    "in_teacher_topology",
    "InheritError",
    "compatibility_problem",
    "delta_factor",
    "inherit",
]
