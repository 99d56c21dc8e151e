"""A user's own network for the tests (``model.arch: "module:user_nets:build"``): no timm class, a projection
shortcut, a max-pool after a linear conv (negative inputs), an average pool, an activation after the add."""
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv1, self.bn1, self.act1 = nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        self.proj = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
        self.act2 = nn.ReLU()
        self.avg = nn.AvgPool2d(2)
        self.head, self.head_act = nn.Conv2d(16, 32, 1), nn.ReLU6()
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.pool(self.stem(x))
        y = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        x = self.act2(y + self.proj(x))
        x = self.head_act(self.head(self.avg(x)))
        return self.fc(x.mean((2, 3)))


def build(num_classes: int) -> nn.Module:
    return Net(num_classes)
