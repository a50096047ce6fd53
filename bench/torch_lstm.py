"""The same model in plain PyTorch: LSTM(28 -> 64) -> BatchNorm1d -> Linear(10), SGD, batch 64.

Runs in its own environment (bench/.venv-torch, made by `make bench`); never a project dependency.
Prints one JSON line with per-epoch seconds (training plus validation, like Keras' fit) and the
final validation accuracy.
"""

import argparse
import json
import time

import numpy as np
import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--data", default="data/raw/mnist.npz")
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--device", default="cpu", help="cuda: the GPU figures in docs/performance.md")
args = parser.parse_args()
torch.manual_seed(0)

with np.load(args.data) as npz:
    x_train = torch.from_numpy(npz["x_train"].astype(np.float32) / 255.0).to(args.device)
    y_train = torch.from_numpy(npz["y_train"].astype(np.int64)).to(args.device)
    x_val = torch.from_numpy(npz["x_test"][:-10].astype(np.float32) / 255.0).to(args.device)
    y_val = torch.from_numpy(npz["y_test"][:-10].astype(np.int64)).to(args.device)


class RowLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(28, 64, batch_first=True)
        self.norm = nn.BatchNorm1d(64)
        self.logits = nn.Linear(64, 10)

    def forward(self, x):
        _, (h, _) = self.lstm(x)
        return self.logits(self.norm(h[-1]))


model = RowLSTM().to(args.device)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
loss_fn = nn.CrossEntropyLoss()
epoch_seconds = []
for _ in range(args.epochs):
    started = time.perf_counter()
    model.train()
    order = torch.randperm(len(x_train), device=args.device)
    for start in range(0, len(order), 64):
        batch = order[start : start + 64]
        optimizer.zero_grad()
        loss = loss_fn(model(x_train[batch]), y_train[batch])
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        correct = sum(
            (model(x_val[i : i + 1024]).argmax(1) == y_val[i : i + 1024]).sum().item()
            for i in range(0, len(x_val), 1024)
        )
    epoch_seconds.append(time.perf_counter() - started)
print(json.dumps({"epoch_seconds": epoch_seconds, "val_accuracy": correct / len(x_val)}))
