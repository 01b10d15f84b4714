"""to_onnx leaves the caller's module in the train/eval state it had (per submodule), and the graph's outputs
carry no batch fixed by the example: a batch-1 trace then runs at batch 8 without ONNX Runtime's "Expected
shape {1,3} ... actual {8,3}" warning."""

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from deepseek_moe import MoE, MoEConfig
from deepseek_moe.export import to_onnx

DIM = 32
CFG = MoEConfig(dim=DIM, moe_inter_dim=32, n_routed_experts=4, n_activated_experts=2, n_shared_experts=1)


class TokenClassifier(nn.Module):
    """(B, D) in, (B, 3) out: the case where the exporter fixed the output batch to the example's 1."""

    def __init__(self) -> None:
        super().__init__()
        self.moe = MoE(CFG)
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.moe(x))


def test_outputs_have_no_batch_fixed_by_the_example(tmp_path, capfd) -> None:
    torch.manual_seed(0)
    model = TokenClassifier().eval()
    path = to_onnx(model, tmp_path / "m.onnx", (torch.randn(1, DIM),))
    (out,) = onnx.load(str(path)).graph.output
    dims = out.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")
    assert dims[1].dim_value == 3  # a true constant stays one
    capfd.readouterr()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((8, DIM)).astype(np.float32)
    (y,) = session.run(None, {"x": x})
    with torch.no_grad():
        np.testing.assert_allclose(y, model(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)
    assert "VerifyOutputSizes" not in capfd.readouterr().err


def test_to_onnx_restores_the_callers_train_and_eval_modes(tmp_path) -> None:
    model = TokenClassifier().train()
    model.head.eval()  # a mixed state: restored per submodule
    before = {name: m.training for name, m in model.named_modules()}
    to_onnx(model, tmp_path / "m.onnx", (torch.randn(2, DIM),))
    assert {name: m.training for name, m in model.named_modules()} == before
    assert model.training and not model.head.training
