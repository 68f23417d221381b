"""Shared helpers of the CLI tests: the error policy (one line on stderr, exit code 1, no traceback) and a model
factory file whose network ends in its own sigmoid."""

from pathlib import Path


def assert_one_line_error(result, *needles):
    assert result.exit_code == 1, (result.exit_code, result.output, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("medcam: error:") and "Traceback" not in result.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def write_sigmoid_factory(path: Path) -> Path:
    """A ``--model FILE:build`` factory whose 4-channel 3D net outputs probabilities (its own sigmoid, 1 channel)."""
    path.write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        torch.manual_seed(0)\n"
        "        self.feat = torch.nn.Sequential(torch.nn.Conv3d(4, 4, 3, padding=1), torch.nn.ReLU())\n"
        "        self.head = torch.nn.Conv3d(4, 1, 1)\n"
        "    def forward(self, x):\n"
        "        return torch.sigmoid(self.head(self.feat(x)) + 3 * x[:, 3:4] - 1)\n"
        "def build():\n    return Net()\n"
    )
    return path
