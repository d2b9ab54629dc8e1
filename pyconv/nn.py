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
    "Conv2d",
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


class Conv2d(torch.nn.Conv2d):
    """torch.nn.Conv2d's constructor, parameters, initialisation and state_dict; the convolution
    runs on pyconv's kernels. padding_mode other than 'zeros' pads with torch's F.pad first, as
    torch.nn.Conv2d does."""

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            input = torch.nn.functional.pad(
                input, self._reversed_padding_repeated_twice, mode=self.padding_mode
            )
            return F.conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
