"""Drop-in modules: the same constructors, attributes, repr and state_dict as torch.nn's."""

import torch

from . import functional as F

__all__ = ["Dropout", "Dropout1d", "Dropout2d", "Dropout3d"]


# Subclasses of torch's own dropout modules: they keep torch's constructor checks, attributes and
# repr (and isinstance(m, torch.nn.Dropout) holds); only forward runs pyconv's kernels.


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
