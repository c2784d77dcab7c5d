"""Loss functions shared by hfx trainers."""

from __future__ import annotations

import torch


def topk_distillation_loss(
    student_hidden: torch.Tensor,
    output_embeddings: torch.nn.Module,
    loss_mask: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's stored top-k distribution.

    Only positions with a label are projected to the vocabulary and normalised: ``student_hidden`` is the final
    (normed) hidden state ``[batch, seq, hidden]``, and the LM head plus log-softmax run on the ``loss_mask``
    positions alone, which is most of the memory and time of a full-vocabulary loss at these sequence lengths.

    Args:
        student_hidden: ``[batch, seq, hidden]`` final hidden states of the student.
        output_embeddings: the LM head (``model.get_output_embeddings()``).
        loss_mask: ``[batch, seq]`` bool, True where the next token has a teacher distribution.
        teacher_topk_ids: ``[batch, seq, k]`` token ids of the teacher's top-k at each position.
        teacher_topk_logprobs: ``[batch, seq, k]`` the teacher's log-probabilities of those ids (full-vocabulary
            normalised; their mass over the top-k is used as the target weights, as stored).

        reduction: ``"mean"`` over labelled positions, or ``"sum"`` (for a caller that divides by a token count
            taken over several batches or processes).

    Returns:
        Mean (or sum) over labelled positions of ``-sum_k p_teacher(k) * log p_student(k)``.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
    if loss_mask.sum() == 0:
        # Keep the graph connected so DDP/accumulation see a gradient (of zero).
        return student_hidden.sum() * 0.0
    hidden = student_hidden[loss_mask]
    student_logprobs = torch.log_softmax(output_embeddings(hidden).float(), dim=-1)
    ids = teacher_topk_ids[loss_mask].long()
    teacher_probs = teacher_topk_logprobs[loss_mask].float().exp()
    student_at_teacher_topk = student_logprobs.gather(-1, ids)
    per_position = -(teacher_probs * student_at_teacher_topk).sum(-1)
    return per_position.sum() if reduction == "sum" else per_position.mean()


def full_vocab_distillation_loss(
    student_logits: torch.Tensor,
    loss_mask: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
) -> torch.Tensor:
    """The straightforward form of :func:`topk_distillation_loss`: log-softmax over every position's full logits.

    Same value; kept as the baseline the trainer benchmark compares against.
    """
    student_logprobs = torch.log_softmax(student_logits.float(), dim=-1)
    per_position = -(
        teacher_topk_logprobs.float().exp() * student_logprobs.gather(-1, teacher_topk_ids.long())
    ).sum(-1)
    return per_position[loss_mask].mean()


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(P_reference || P) for logits ``[..., vocab]`` (computed in fp32).

    The Consistency Lens uses it between the frozen model's next-token distribution with its own activation
    (reference) and with the lens's reconstruction patched in."""
    reference = torch.log_softmax(reference_logits.float(), dim=-1)
    other = torch.log_softmax(logits.float(), dim=-1)
    return torch.nn.functional.kl_div(other, reference, log_target=True, reduction="none").sum(-1).mean()


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the distributions given by logits ``[..., vocab]``."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return -(logprobs.exp() * logprobs).sum(-1).mean()


def topk_kl_divergence(
    reference_topk_ids: torch.Tensor, reference_topk_logprobs: torch.Tensor, logits: torch.Tensor
) -> torch.Tensor:
    """Mean KL(P_reference || P) when only the reference's top-k log-probabilities were stored.

    The vocabulary is coarse-grained into the k stored tokens plus one bucket for the rest, so this is the KL
    between those (k + 1)-way distributions: a lower bound of the full KL, equal to it when the top-k hold all
    the reference mass. ``reference_topk_*`` are ``[batch, k]``, ``logits`` ``[batch, vocab]``."""
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, reference_topk_ids.long())
    reference = reference_topk_logprobs.float()
    eps = 1e-6
    reference_rest = (1 - reference.exp().sum(-1)).clamp(min=eps)
    rest = (1 - logprobs.exp().sum(-1)).clamp(min=eps)
    kept = (reference.exp() * (reference - logprobs)).sum(-1)
    return (kept + reference_rest * (reference_rest.log() - rest.log())).mean()


def cosine_regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``2 (1 - cos(prediction, target))`` (fp32): the squared distance between the two vectors
    normalised to unit length, the regression loss of a reconstructor that must point where the activation points
    (the Natural Language Autoencoders' reconstructor). 0 for parallel vectors, 2 for orthogonal, 4 for opposite."""
    cosine = torch.nn.functional.cosine_similarity(prediction.float(), target.float(), dim=-1)
    return (2 * (1 - cosine)).mean()
