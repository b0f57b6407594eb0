"""bench/roofline.py: the op-by-op byte count behind the memory floor (known ops, by hand) and a short run on a tiny
model that writes its table."""
import torch

from conftest import bench_module


def _roofline(): return bench_module("roofline")


def test_bytes_counted_by_hand():
    rl = _roofline()
    a, b = torch.ones(1000), torch.ones(1000)
    with rl.ByteCounter() as bc: a + b
    assert bc.by_op == {"add": 12000}  # reads 2 x 4,000 bytes, writes 4,000
    with rl.ByteCounter() as bc: a.add_(b)
    assert bc.total == 12000  # in place: reads a and b, writes a
    with rl.ByteCounter() as bc: a.view(10, 100).t()
    assert bc.total == 0  # views move nothing
    row = torch.ones(1, 1000)
    with rl.ByteCounter() as bc: row.expand(8, 1000) * 2.0
    assert bc.total == 4000 + 32000  # an expanded input is read once: its storage, not its 8 repeats
    with rl.ByteCounter() as bc: a.to(torch.bfloat16)
    assert bc.total == 4000 + 2000


def test_tiny_run_writes_the_table(tmp_path):
    rl = _roofline()
    out = tmp_path / "r.md"
    rl.main(["--arch", "resnet18", "--bs", "2", "--size", "32", "--reps", "1", "--out", str(out)])
    text = out.read_text()
    assert "Copy bandwidth" in text and "| fp32 | NCHW |" in text and "convolution" in text
    assert "LOAD_END" not in text
