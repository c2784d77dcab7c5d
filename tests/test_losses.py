import torch

from hfx.losses import full_vocab_distillation_loss, topk_distillation_loss


def _inputs(batch=3, seq=7, hidden=16, vocab=50, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(batch, seq, hidden, generator=g, requires_grad=True)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    mask = torch.rand(batch, seq, generator=g) > 0.4
    teacher_logits = torch.randn(batch, seq, vocab, generator=g)
    values, ids = torch.log_softmax(teacher_logits, -1).topk(k, -1)
    return hidden_states, head, mask, ids, values


def test_topk_loss_matches_full_vocabulary_loss_and_gradient():
    hidden, head, mask, ids, logprobs = _inputs()
    fast = topk_distillation_loss(hidden, head, mask, ids, logprobs)
    (grad_fast,) = torch.autograd.grad(fast, hidden)
    slow = full_vocab_distillation_loss(head(hidden), mask, ids, logprobs)
    (grad_slow,) = torch.autograd.grad(slow, hidden)
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(grad_fast, grad_slow)


def test_topk_loss_is_minimised_by_the_teacher_distribution():
    hidden, head, mask, ids, logprobs = _inputs(k=50)  # k = vocab: the full teacher distribution
    teacher_probs = logprobs.exp()
    # A student equal to the teacher reaches the teacher's entropy, a random student does worse.
    student_logits = torch.full((*ids.shape[:2], 50), -1e4).scatter(-1, ids, logprobs)
    matched = full_vocab_distillation_loss(student_logits, mask, ids, logprobs)
    entropy = -(teacher_probs * logprobs).sum(-1)[mask].mean()
    torch.testing.assert_close(matched, entropy, rtol=1e-4, atol=1e-4)
    assert topk_distillation_loss(hidden, head, mask, ids, logprobs) > entropy


def test_topk_loss_with_no_labels_is_zero_and_differentiable():
    hidden, head, mask, ids, logprobs = _inputs()
    loss = topk_distillation_loss(hidden, head, torch.zeros_like(mask), ids, logprobs)
    assert loss.item() == 0.0
    loss.backward()
    assert hidden.grad is not None


def test_cosine_regression_loss_is_zero_for_parallel_vectors_and_grows_with_the_angle():
    import math

    from hfx.losses import cosine_regression_loss

    target = torch.tensor([[3.0, 0.0]])
    assert cosine_regression_loss(torch.tensor([[0.5, 0.0]]), target).item() == 0.0  # length does not count
    losses = []
    for degrees in (0, 30, 60, 90, 135, 180):
        angle = math.radians(degrees)
        losses.append(
            cosine_regression_loss(torch.tensor([[math.cos(angle), math.sin(angle)]]), target).item()
        )
    assert losses == sorted(losses) and len(set(losses)) == len(losses)
    assert abs(losses[3] - 2.0) < 1e-6 and abs(losses[5] - 4.0) < 1e-6
    prediction = torch.tensor([[1.0, 1.0]], requires_grad=True)
    cosine_regression_loss(prediction, target).backward()
    assert prediction.grad[0, 1] > 0  # the gradient turns the prediction toward the target
