"""Training caches read entries memory-mapped: the same values, views of the file's pages."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from charaforge.train.caches import TensorCache, load_mapped


def backing_file(tensor: torch.Tensor) -> str | None:
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(part, 16) for part in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) == 6 else None
    return None


def test_entries_come_back_equal_and_memory_mapped(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(3)
    computed = {
        "parameters": torch.randn(8, 16, 16, generator=generator),
        "mask": torch.rand(4, 5, generator=generator) > 0.5,
        "half": torch.randn(3, 7, generator=generator).to(torch.bfloat16),
        "empty": torch.zeros(0, 3),
    }
    cache = TensorCache(tmp_path, "latents")
    first = cache.get_or_compute("ab" * 16, lambda: computed)
    again = TensorCache(tmp_path, "latents").get_or_compute("ab" * 16, lambda: {})
    file = next((tmp_path / "latents").rglob("*.safetensors"))
    reference = load_file(str(file))  # safetensors' own reader, a copy
    for entry in (first, again):
        assert set(entry) == set(computed)
        for name, value in computed.items():
            assert entry[name].dtype == value.dtype and entry[name].shape == value.shape
            assert torch.equal(entry[name], value) and torch.equal(reference[name], value)
        # Views of the cache file's pages, not copies in the process heap.
        assert backing_file(entry["parameters"]) == str(file.resolve())
    # Writes to a mapped entry are private (copy-on-write): the file keeps its bytes.
    again["parameters"].add_(1.0)
    assert torch.equal(load_mapped(file)["parameters"], computed["parameters"])


def test_mapped_entries_hold_no_open_files(tmp_path: Path) -> None:
    """A 20k-image dataset maps 20k latent and 20k text entries: one descriptor per map would
    pass the open-files limit, so a mapped entry must keep none open."""
    cache = TensorCache(tmp_path, "latents")
    cache.get_or_compute("cd" * 16, lambda: {"parameters": torch.ones(8, 4, 4)})
    open_before = len(list(Path("/proc/self/fd").iterdir()))
    entries = [
        TensorCache(tmp_path, "latents").get_or_compute("cd" * 16, lambda: {}) for _ in range(50)
    ]
    assert len(list(Path("/proc/self/fd").iterdir())) <= open_before + 1
    assert all(backing_file(entry["parameters"]) is not None for entry in entries)
