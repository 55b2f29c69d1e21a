"""A tiny synthetic data module (copy a random sequence) for CLI smoke tests, kept out of the package."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset


class CopyTaskDataModule(LightningDataModule):
    """Random id sequences whose target is the source between BOS and EOS (pad 0, bos 1, eos 2)."""

    def __init__(self, vocab_size: int = 20, num_samples: int = 64, seq_len: int = 8, batch_size: int = 16,
                 seed: int = 0, shuffle: bool = True) -> None:
        super().__init__()
        self.vocab_size, self.batch_size, self.shuffle = vocab_size, batch_size, shuffle
        generator = torch.Generator().manual_seed(seed)
        body = torch.randint(3, vocab_size, (num_samples, seq_len), generator=generator)
        eos = torch.full((num_samples, 1), 2)
        self.src = torch.cat([body, eos], dim=1)
        self.tgt = torch.cat([torch.ones(num_samples, 1, dtype=torch.long), body, eos], dim=1)

    def _loader(self, shuffle: bool) -> DataLoader:
        return DataLoader(TensorDataset(self.src, self.tgt), batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader(shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(shuffle=False)
