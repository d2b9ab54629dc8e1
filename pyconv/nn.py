"""Drop-in modules: the same constructors, attributes, repr and state_dict as torch.nn's."""

import torch

from . import functional as F

__all__ = [
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "MaxPool2d",
    "AvgPool2d",
]


# Subclasses of torch's own modules: they keep torch's constructor checks, attributes, repr and
# state_dict (and isinstance(m, torch.nn.Dropout) holds); only forward runs pyconv's kernels.


class Dropout(torch.nn.Dropout):
    def forward(self, input):
        return F.dropout(input, self.p, self.training, self.inplace)


class Dropout1d(torch.nn.Dropout1d):
    def forward(self, input):
        return F.dropout1d(input, self.p, self.training, self.inplace)


class Dropout2d(torch.nn.Dropout2d):
    def forward(self, input):
        return F.dropout2d(input, self.p, self.training, self.inplace)


class Dropout3d(torch.nn.Dropout3d):
    def forward(self, input):
        return F.dropout3d(input, self.p, self.training, self.inplace)


class MaxPool2d(torch.nn.MaxPool2d):
    def forward(self, input):
        return F.max_pool2d(
            input,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            ceil_mode=self.ceil_mode,
            return_indices=self.return_indices,
        )


class AvgPool2d(torch.nn.AvgPool2d):
    def forward(self, input):
        return F.avg_pool2d(
            input,
            self.kernel_size,
            self.stride,
            self.padding,
            self.ceil_mode,
            self.count_include_pad,
            self.divisor_override,
        )
