"""An independent PyTorch transcription of torchreid's OSNet (test reference only).

Written from the paper and torchreid's published layout (module names match its
state-dict keys), with plain torch.nn layers, so a torchreid checkpoint loads with
load_state_dict and the forward is torch's own.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ConvBN(nn.Module):
    def __init__(self, cin, cout, k=1, stride=1, padding=0, relu=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = relu

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class Light(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False, groups=cout)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv2(self.conv1(x))))


class Gate(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // 16, 1)
        self.fc2 = nn.Conv2d(c // 16, c, 1)

    def forward(self, x):
        g = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(g))))


class Block(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        mid = cout // 4
        self.conv1 = ConvBN(cin, mid)
        self.conv2a = Light(mid, mid)
        self.conv2b = nn.Sequential(*[Light(mid, mid) for _ in range(2)])
        self.conv2c = nn.Sequential(*[Light(mid, mid) for _ in range(3)])
        self.conv2d = nn.Sequential(*[Light(mid, mid) for _ in range(4)])
        self.gate = Gate(mid)
        self.conv3 = ConvBN(mid, cout, relu=False)
        self.downsample = ConvBN(cin, cout, relu=False) if cin != cout else None

    def forward(self, x):
        x1 = self.conv1(x)
        x2 = sum(self.gate(s(x1)) for s in (self.conv2a, self.conv2b, self.conv2c, self.conv2d))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv3(x2) + identity)


class TorchOSNet(nn.Module):
    def __init__(self, channels=(16, 64, 96, 128), feature_dim=512, num_classes=10):
        super().__init__()
        c0, c1, c2, c3 = channels
        self.conv1 = ConvBN(3, c0, 7, 2, 3)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        def stage(cin, cout, transition):
            layers = [Block(cin, cout), Block(cout, cout)]
            if transition:
                layers.append(nn.Sequential(ConvBN(cout, cout), nn.AvgPool2d(2, stride=2)))
            return nn.Sequential(*layers)

        self.conv2 = stage(c0, c1, True)
        self.conv3 = stage(c1, c2, True)
        self.conv4 = stage(c2, c3, False)
        self.conv5 = ConvBN(c3, c3)
        self.fc = nn.Sequential(nn.Linear(c3, feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU())
        self.classifier = nn.Linear(feature_dim, num_classes)

    def featuremaps(self, x):
        x = self.maxpool(self.conv1(x))
        return self.conv5(self.conv4(self.conv3(self.conv2(x))))

    def forward(self, x):
        """x: (B, 3, H, W) already normalised -> the 512-d `fc` feature."""
        v = F.adaptive_avg_pool2d(self.featuremaps(x), 1).flatten(1)
        return self.fc(v)
