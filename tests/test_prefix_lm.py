"""PrefixLM with a random split (SimVLM §3.2, mPLUG): the split, the loss mask, the model's loss against
a per-token loop written here; plain captioning stays the default."""

import pytest
import torch
import torch.nn.functional as F

import bus_model
from bus_model.losses import prefix_lm_targets, random_prefix_lengths
from bus_model.text import padding_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_split_points_are_uniform_in_range():
    mask = torch.zeros(3000, 12, dtype=torch.long)
    lengths = torch.tensor([2, 5, 12]).repeat(1000)
    for b, n in enumerate(lengths.tolist()):
        mask[b, :n] = 1
    torch.manual_seed(0)
    prefix = random_prefix_lengths(mask)
    for n in (2, 5, 12):
        got = prefix[lengths == n]
        assert got.min() >= 1 and got.max() <= n - 1  # [CLS] always context, one token always predicted
        counts = torch.bincount(got, minlength=n)[1:n].double()
        assert (counts > 0).all() and (counts.max() - counts.min()) / counts.mean() < 0.5, (n, counts)


def test_targets_mask_prefix_and_padding():
    ids = torch.tensor([[1, 7, 8, 9, 2, 0], [1, 5, 6, 2, 0, 0]])
    mask = (ids != 0).long()
    targets = prefix_lm_targets(ids, mask, torch.tensor([3, 1]))
    # decoder input position t predicts token t + 1; row 0 keeps tokens 3.. (9, [SEP]); row 1 all real ones
    assert targets.tolist() == [[-100, -100, 9, 2, -100], [5, 6, 2, -100, -100]]
    assert prefix_lm_targets(ids, mask, None).tolist() == [[7, 8, 9, 2, -100], [5, 6, 2, -100, -100]]


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 128, (3, 12), generator=g)
    ids[:, 0] = 1
    mask = torch.ones(3, 12, dtype=torch.long)
    for b, n in enumerate((12, 7, 4)):
        ids[b, n - 1], ids[b, n:], mask[b, n:] = 2, 0, 0
    return torch.randn(3, 3, 32, 32, generator=g), ids, mask


def test_model_prefix_loss_equals_per_token_loop():
    only_prefix = {"itc": False, "itm": False, "mlm": False, "ptm": False, "prefix_split": "random"}
    torch.manual_seed(0)
    model = bus_model.create_model("bus-tiny", kernel_backend="torch", losses=only_prefix).double()
    images, ids, mask = _batch()
    images = images.double()
    torch.manual_seed(9)
    out = model(images, ids, mask)
    torch.manual_seed(9)
    prefix = random_prefix_lengths(mask)  # the same draw
    with torch.no_grad():
        logits = model.decoder(ids[:, :-1], padding_mask(mask[:, :-1]), out.memory, out.memory_mask)
    terms = []
    for b in range(3):
        n = int(mask[b].sum())
        for j in range(int(prefix[b]), n):  # predict token j from tokens < j (the prefix is context)
            terms.append(-F.log_softmax(logits[b, j - 1].double(), -1)[ids[b, j]])
    torch.testing.assert_close(out.losses["prefix_lm"].double(), torch.stack(terms).mean(), rtol=1e-6, atol=1e-8)
    assert (prefix > 1).any()  # the split really dropped some tokens from the loss


def test_plain_captioning_is_the_default():
    assert bus_model.get_config("bus-base").losses.prefix_split == "none"
    torch.manual_seed(0)
    model = bus_model.create_model("bus-tiny", kernel_backend="torch",
                                   losses={"itc": False, "itm": False, "mlm": False, "ptm": False})
    images, ids, mask = _batch()
    out = model(images, ids, mask)
    ref = model.decoder.loss(ids, mask, out.memory, out.memory_mask)
    torch.testing.assert_close(out.losses["prefix_lm"], ref)
