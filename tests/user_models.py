"""Users' own ResNet-style models, loaded by the tests through ``--model tests/user_models.py:FN``."""

import torch
from torch import nn
from torch.nn import functional as F


class Residual(nn.Module):
    """The d2l.ai residual block: two 3x3 convs, optional 1x1-conv projection shortcut."""

    def __init__(self, in_channels, channels, use_1x1conv=False, strides=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1, stride=strides)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(in_channels, channels, kernel_size=1, stride=strides) if use_1x1conv else None
        self.bn1 = nn.BatchNorm2d(channels)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, X):
        Y = F.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3:
            X = self.conv3(X)
        Y += X
        return F.relu(Y)


def _stage(in_channels, channels, blocks, first_block=False):
    layers = []
    for i in range(blocks):
        if i == 0 and not first_block:
            layers.append(Residual(in_channels, channels, use_1x1conv=True, strides=2))
        else:
            layers.append(Residual(channels, channels))
    return nn.Sequential(*layers)


def d2l_resnet18(in_channels=1, num_classes=10):
    """The d2l textbook's Fashion-MNIST ResNet-18: an nn.Sequential, 1 input channel."""
    return nn.Sequential(
        nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        ),
        _stage(64, 64, 2, first_block=True),
        _stage(64, 128, 2),
        _stage(128, 256, 2),
        _stage(256, 512, 2),
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(512, num_classes),
    )


class CifarResNet(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem conv without max-pool, narrow widths."""

    def __init__(self, num_classes=10, widths=(16, 32, 64)):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(widths[0])
        stages, in_channels = [], widths[0]
        for i, width in enumerate(widths):
            stages.append(Residual(in_channels, width, use_1x1conv=in_channels != width, strides=1 if i == 0 else 2))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.stages(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def cifar_resnet():
    return CifarResNet()


class BrokenResidual(nn.Module):
    """A residual block whose branch changes the channel count and has no projection shortcut."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + x


def broken_resnet():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BrokenResidual(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class BnAfterRelu(nn.Module):
    """BatchNorms that cannot be folded: one after a ReLU, one on a conv output used twice."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_after_relu = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_shared_input = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_ok = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.bn_after_relu(F.relu(self.conv1(x)))
        y = self.conv2(x)
        x = self.bn_shared_input(y) + y
        x = self.bn_ok(self.conv3(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def unfoldable_bn():
    return BnAfterRelu()


not_callable = 42


def returns_dict():
    return {"conv": nn.Conv2d(3, 8, 3)}


def raises():
    raise RuntimeError("factory exploded")


def digits_resnet():
    """The CIFAR-style ResNet for 1-channel handwritten digits (tests/digits.py trains it)."""
    model = CifarResNet(num_classes=10, widths=(16, 32, 64))
    model.stem = nn.Conv2d(1, 16, 3, padding=1, bias=False)
    return model
