"""CAM weight expressions (SyCAM grammar): parse, check, evaluate; :class:`SynthesizedCAM` runs one as a method.

Grammar (text, Python-like; ``^`` is accepted for ``**``)::

    expr  := expr (+ | - | * | /) expr | -expr | expr ** INT | (expr) | NUMBER | N | sum(pos) | pos
    pos   := g | A | relu(pos) | pos (+ | - | *) pos | NUMBER * pos | pos ** INT     (per position, per channel)

``A`` is the hooked activation, ``g = dS/dA`` its score gradient (``[B, K, *f]``), ``sum(.)`` sums over the feature
grid per channel, ``N`` is the number of feature positions (of the whole volume with sliding windows).

Two kinds of expressions, both exact with MONAI sliding windows:

* **pooled**: no bare ``g``/``A`` outside ``sum``. The expression gives per-channel weights ``alpha_k`` and the map is
  ``sum_k alpha_k A_k`` (Grad-CAM: ``sum(g) / N``; XGrad-CAM: ``sum(g*A) / sum(A)``). Each ``sum(...)`` is additive
  over windows: a term with ``g`` must vanish where ``g = 0`` (windows outside the ROI add nothing); a term without
  ``g`` is an activation statistic, taken over every window with the normalised blending weights.
* **element-wise**: ``g``/``A`` outside any ``sum``, no ``sum``/``N``. The map is ``sum_k expr(A_k(u), g_k(u))``
  (HiResCAM: ``g*A``; LayerCAM: ``relu(g)*A``). It must be positively homogeneous of degree 1 in ``g``
  (``f(A, c g) = c f(A, g)`` for ``c > 0``), which is what makes the sum of blended window maps exact.

Division is protected: where a denominator is exactly 0 the quotient is 0 (as Grad-CAM++'s ``a = 0`` convention);
an expression whose denominator is 0 on every random check input is refused.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .engine import BaseSegCAM
from .errors import MedcamError
from .formulas import ActivationPooledFormula, ElementwiseFormula, Formula, PooledFormula, Statistics

__all__ = [
    "ExpressionError",
    "Expr",
    "parse_expression",
    "SynthesizedCAM",
    "KNOWN_EXPRESSIONS",
    "random_inputs",
    "expression_formula",
]

#: the built-in methods this grammar expresses, as expression text
KNOWN_EXPRESSIONS: dict[str, str] = {
    "gradcam": "sum(g) / N",
    "xgradcam": "sum(g*A) / sum(A)",
    "hirescam": "g*A",
    "layercam": "relu(g)*A",
}


class ExpressionError(MedcamError):
    """A CAM expression that does not parse or cannot be evaluated exactly."""


# ---------------------------------------------------------------------------------------------------- the tree
@dataclass(frozen=True)
class Expr:
    """A node: ``op`` in {num, g, A, N, neg, relu, sum, +, -, *, /, pow}; ``args`` its children; ``value`` for num
    (and the exponent for pow)."""

    op: str
    args: tuple[Expr, ...] = ()
    value: float = 0.0

    # -- text -----------------------------------------------------------------------------------------------------
    def __str__(self) -> str:
        return self.text()

    def text(self, parent: int = 0) -> str:
        prec = {"+": 1, "-": 1, "*": 2, "/": 2, "neg": 3, "pow": 4}
        if self.op == "num":
            v = self.value
            return str(int(v)) if float(v).is_integer() else repr(v)
        if self.op in ("g", "A", "N"):
            return self.op
        if self.op in ("relu", "sum"):
            return f"{self.op}({self.args[0].text()})"
        p = prec[self.op]
        if self.op == "neg":
            s = f"-{self.args[0].text(p)}"
        elif self.op == "pow":
            s = f"{self.args[0].text(p + 1)}^{int(self.value)}"
        else:
            right = self.args[1].text(p + 1)  # left-associative: a right operand of equal precedence is bracketed
            s = (
                f"{self.args[0].text(p)}{self.op}{right}"
                if self.op in "*/"
                else f"{self.args[0].text(p)} {self.op} {right}"
            )
        return f"({s})" if p < parent else s

    @property
    def size(self) -> int:
        """Number of nodes (the search's size bound)."""
        return 1 + sum(a.size for a in self.args)

    def walk(self):
        yield self
        for a in self.args:
            yield from a.walk()

    # -- classification -------------------------------------------------------------------------------------------
    def has_bare_position(self) -> bool:
        """Whether ``g`` or ``A`` occurs outside every ``sum``."""
        if self.op in ("g", "A"):
            return True
        if self.op == "sum":
            return False
        return any(a.has_bare_position() for a in self.args)

    def uses(self, name: str) -> bool:
        return any(n.op == name for n in self.walk())

    @property
    def kind(self) -> str:
        return "elementwise" if self.has_bare_position() else "pooled"

    def sums(self) -> list[Expr]:
        """The distinct ``sum(...)`` terms (outermost), in order of appearance."""
        out: list[Expr] = []

        def rec(e: Expr) -> None:
            if e.op == "sum":
                if e not in out:
                    out.append(e)
                return
            for a in e.args:
                rec(a)

        rec(self)
        return out

    # -- evaluation -----------------------------------------------------------------------------------------------
    def evaluate(self, env: dict[str, Any], zero_div: list[bool] | None = None) -> Any:
        """Evaluate with ``env``: ``g``/``A`` tensors, ``N`` a number, and ``sum:<text>`` the value of each ``sum``
        term (else the sum is taken over dims >= 2 of its operand). ``zero_div``: appended True for each division
        whose denominator is 0 everywhere."""
        op = self.op
        if op == "num":
            return self.value
        if op in ("g", "A", "N"):
            return env[op]
        if op == "sum":
            key = "sum:" + self.args[0].text()
            if key in env:
                return env[key]
            v = self.args[0].evaluate(env, zero_div)
            return v.flatten(2).sum(-1) if isinstance(v, torch.Tensor) else v
        vals = [a.evaluate(env, zero_div) for a in self.args]
        if op == "neg":
            return -vals[0]
        if op == "relu":
            return torch.relu(vals[0]) if isinstance(vals[0], torch.Tensor) else max(vals[0], 0.0)
        if op == "pow":
            return vals[0] ** int(self.value)
        a, b = vals
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        # protected division
        if not isinstance(b, torch.Tensor):
            if b == 0:
                if zero_div is not None:
                    zero_div.append(True)
                return a * 0.0
            return a / b
        nz = b != 0
        if zero_div is not None and not bool(nz.any()):
            zero_div.append(True)
        return torch.where(nz, a / torch.where(nz, b, torch.ones_like(b)), torch.zeros_like(b * a))


# ---------------------------------------------------------------------------------------------------- parsing
_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def _convert(node: ast.AST, text: str) -> Expr:
    if isinstance(node, ast.Expression):
        return _convert(node.body, text)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Expr("num", value=float(node.value))
    if isinstance(node, ast.Name):
        if node.id in ("g", "A", "N"):
            return Expr(node.id)
        raise ExpressionError(f"unknown name {node.id!r} in {text!r}; the names are g, A, N (and relu(), sum())")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _convert(node.operand, text)
        return inner if isinstance(node.op, ast.UAdd) else Expr("neg", (inner,))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        exp = node.right
        if not (isinstance(exp, ast.Constant) and isinstance(exp.value, int) and 1 <= exp.value <= 4):
            raise ExpressionError(f"in {text!r}: powers must be whole numbers 1..4 (e.g. g^2)")
        return Expr("pow", (_convert(node.left, text),), value=float(exp.value))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return Expr(_BINOPS[type(node.op)], (_convert(node.left, text), _convert(node.right, text)))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("relu", "sum"):
        if len(node.args) != 1 or node.keywords:
            raise ExpressionError(f"in {text!r}: {node.func.id}() takes exactly one argument")
        return Expr(node.func.id, (_convert(node.args[0], text),))
    what = ast.unparse(node) if hasattr(ast, "unparse") else type(node).__name__
    raise ExpressionError(
        f"cannot use {what!r} in the CAM expression {text!r}; allowed: numbers, g, A, N, + - * / ^, relu(), sum()"
    )


def parse_expression(text: str, *, check: bool = True) -> Expr:
    """Parse and (by default) check a CAM expression; raises :class:`ExpressionError` naming the problem.

    Checks: the grammar (see the module docstring); no ``sum`` inside ``sum``; pooled terms with ``g`` vanish at
    ``g = 0``; element-wise expressions have no ``sum``/``N`` and are homogeneous of degree 1 in ``g``; no division by
    a denominator that is zero on every random check input; the result is finite and not zero everywhere.
    """
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError("the CAM expression is empty; e.g. 'sum(g) / N' (Grad-CAM) or 'g*A' (HiResCAM)")
    src = text.strip().replace("^", "**")
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError as e:
        raise ExpressionError(f"the CAM expression {text!r} does not parse: {e.msg} at column {e.offset}") from None
    expr = _convert(tree, text)
    if check:
        check_expression(expr, text)
    return expr


def random_inputs(seed: int = 0, k: int = 8, n: int = 48, draws: int = 3) -> list[dict[str, Any]]:
    """Random ``(A, g)`` pairs ``[1, K, n]`` (float64) for equivalence checks; A of mixed sign, g small."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(draws):
        a = torch.randn(1, k, n, generator=gen, dtype=torch.float64) + 0.7
        g = torch.randn(1, k, n, generator=gen, dtype=torch.float64) * 0.3
        out.append({"A": a, "g": g, "N": float(n)})
    return out


def _bad(expr: Expr, text: str, msg: str) -> ExpressionError:
    return ExpressionError(f"CAM expression {text!r}: {msg}")


def check_expression(expr: Expr, text: str | None = None) -> None:
    """The checks of :func:`parse_expression` on a parsed expression."""
    text = text or expr.text()
    for s in expr.sums():
        if s.args[0].uses("sum"):
            raise _bad(expr, text, "sum() inside sum() is not additive over windows; write the inner sum separately")
        if s.args[0].uses("N"):
            raise _bad(expr, text, "N inside sum() is not allowed; multiply outside the sum")
    envs = random_inputs()
    if expr.kind == "elementwise":
        if expr.uses("sum") or expr.uses("N"):
            raise _bad(
                expr,
                text,
                "mixes per-position terms (g, A outside sum) with pooled ones (sum, N); an element-wise map must "
                "use only g, A, relu, numbers, and a pooled expression must keep g and A inside sum()",
            )
        if not expr.uses("g"):
            raise _bad(expr, text, "an element-wise map must depend on the gradient g (e.g. 'g*A')")
        for env in envs:
            f1 = _eval_checked(expr, env, text)
            f2 = _eval_checked(expr, {**env, "g": 2.5 * env["g"]}, text)
            if not torch.allclose(f2, 2.5 * f1, rtol=1e-9, atol=1e-12):
                raise _bad(
                    expr,
                    text,
                    "an element-wise map must be homogeneous of degree 1 in g (like g*A or relu(g)*A): only then "
                    "is the sum of blended window maps exact with sliding windows",
                )
        return
    for s in expr.sums():
        if s.args[0].uses("g"):
            for env in envs:
                z = s.args[0].evaluate({**env, "g": torch.zeros_like(env["g"])})
                if bool((torch.as_tensor(z) != 0).any()):
                    raise _bad(
                        expr,
                        text,
                        f"{s.text()} is not zero where g = 0, so it is neither a gradient statistic nor an "
                        "activation statistic; split it, e.g. sum(g + A) -> sum(g) + sum(A)",
                    )
    for env in envs:
        _eval_checked(expr, env, text)


def _eval_checked(expr: Expr, env: dict[str, Any], text: str) -> torch.Tensor:
    zero_div: list[bool] = []
    v = expr.evaluate(env, zero_div)
    if zero_div:
        raise _bad(expr, text, "divides by zero everywhere (a denominator is identically 0)")
    v = torch.as_tensor(v, dtype=torch.float64)
    if not bool(torch.isfinite(v).all()):
        raise _bad(expr, text, "is not finite on random inputs (overflow?)")
    return v


def pooled_alpha(expr: Expr, env: dict[str, Any]) -> torch.Tensor:
    """Channel weights ``[B, K]`` of a pooled expression (a constant expression broadcasts over channels)."""
    a = env["A"]
    v = expr.evaluate(env)
    v = torch.as_tensor(v, dtype=a.dtype, device=a.device)
    return v.expand(a.shape[0], a.shape[1]) if v.ndim < 2 else v


# ---------------------------------------------------------------------------------------------------- formulas
def _spatial_sum(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).sum(-1)


class ElementwiseExpression(ElementwiseFormula):
    """An element-wise expression as a formula: ``map(u) = sum_k expr(A_k(u), g_k(u))``."""

    def __init__(self, expr: Expr):
        self.expr = expr

    def map(self, activation: torch.Tensor, grad: torch.Tensor, layer: str | None = None) -> torch.Tensor:
        return self.expr.evaluate({"A": activation, "g": grad}).sum(dim=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.expr.text()!r})"


class PooledExpression(PooledFormula):
    """A pooled expression whose ``sum(...)`` terms all involve ``g`` (gradient statistics only)."""

    def __init__(self, expr: Expr):
        self.expr = expr
        self.grad_terms = [s for s in expr.sums() if s.args[0].uses("g")]
        self.act_terms = [s for s in expr.sums() if not s.args[0].uses("g")]

    def gradient_statistics(
        self, activation: torch.Tensor, grad: torch.Tensor, activation_stats: Statistics | None = None
    ) -> Statistics:
        env = {"A": activation, "g": grad}
        return {s.text(): _spatial_sum(s.args[0].evaluate(env)) for s in self.grad_terms}

    def weights(self, stats: Statistics, n_positions: float, layer: str | None = None) -> torch.Tensor:
        ref = next(iter(stats.values())) if stats else None
        if ref is None:  # a constant expression: no statistic tells the channel count
            raise ExpressionError(f"the CAM expression {self.expr.text()!r} has no sum() term")
        env: dict[str, Any] = {"N": float(n_positions), "A": torch.zeros_like(ref)[..., None]}
        env.update({"sum:" + k.removeprefix("sum(")[:-1]: v for k, v in stats.items()})
        return pooled_alpha(self.expr, env)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.expr.text()!r})"


class ActivationPooledExpression(PooledExpression, ActivationPooledFormula):
    """A pooled expression with ``sum(...)`` terms of the activation alone (XGrad-CAM's ``sum(A)``)."""

    def activation_statistics(self, activation: torch.Tensor, weight: torch.Tensor | None) -> Statistics:
        env = {"A": activation, "g": torch.zeros_like(activation[:, :1])}
        out = {}
        for s in self.act_terms:
            v = s.args[0].evaluate(env)
            v = torch.as_tensor(v, dtype=activation.dtype, device=activation.device).expand_as(activation)
            out[s.text()] = _spatial_sum(v if weight is None else v * weight)
        return out


def expression_formula(expr: Expr) -> ElementwiseExpression | PooledExpression:
    """The formula of a (checked) expression: element-wise, pooled, or pooled with activation statistics."""
    if expr.kind == "elementwise":
        return ElementwiseExpression(expr)
    if any(not s.args[0].uses("g") for s in expr.sums()):
        return ActivationPooledExpression(expr)
    return PooledExpression(expr)


class _NoExpression(Formula):
    """Placeholder of :class:`SynthesizedCAM` itself: every instance (or subclass from a file) has its own formula."""

    def map(self, activation: torch.Tensor, grad: torch.Tensor, layer: str | None = None) -> torch.Tensor:
        raise ExpressionError("SynthesizedCAM needs an expression, e.g. expression='sum(g*A) / sum(A)'")


# ---------------------------------------------------------------------------------------------------- the method
class SynthesizedCAM(BaseSegCAM):
    """A CAM method given by an expression of the SyCAM grammar (see the module docstring).

    Args:
        model, layer: as for :class:`medcam.BaseSegCAM`, and its keyword options (inferer, amp, score, ...).
        expression: the expression text (or a parsed :class:`Expr`); defaults to the class attribute
            ``expression`` (set by :meth:`class_from_file`).

    Attributes:
        expr: the parsed expression; ``formula``: its formula (:func:`expression_formula`: element-wise or pooled,
            typed by class as the executors expect); ``report``: the :class:`medcam.synthesis.SynthesisReport` when
            made by :func:`medcam.synthesize` (else None).
    """

    expression: str | None = None
    #: a placeholder: each instance holds its expression's formula (so does each class made by
    #: :meth:`class_from_file`)
    formula = _NoExpression()

    def __init__(self, model: nn.Module, layer: Any = "auto", *, expression: str | Expr | None = None, **kwargs: Any):
        expression = expression if expression is not None else type(self).expression
        if expression is None:
            raise ExpressionError("SynthesizedCAM needs an expression, e.g. expression='sum(g*A) / sum(A)'")
        self.expr = expression if isinstance(expression, Expr) else parse_expression(expression)
        if isinstance(expression, Expr):
            check_expression(self.expr)
        # the instance's own formula, shadowing the class placeholder (BaseSegCAM declares formula per class)
        self.__dict__["formula"] = expression_formula(self.expr)
        self.report: Any = None
        super().__init__(model, layer, **kwargs)

    @property
    def text(self) -> str:
        return self.expr.text()

    def __repr__(self) -> str:
        return f"SynthesizedCAM({self.text!r})"

    # -- files ------------------------------------------------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the expression text (one line) to ``path`` (temp file + rename; refuses to overwrite unless asked)."""
        return save_expression(self.text, path, overwrite=overwrite)

    @classmethod
    def class_from_file(cls, path: str | Path) -> type[SynthesizedCAM]:
        """A :class:`SynthesizedCAM` subclass bound to the expression saved in ``path`` (for ``-M synth:FILE``)."""
        text = load_expression(path)
        formula = expression_formula(parse_expression(text))
        return type(f"SynthesizedCAM[{Path(path).name}]", (cls,), {"expression": text, "formula": formula})


def save_expression(text: str, path: str | Path, overwrite: bool = False) -> Path:
    """Save expression text to ``path``: a comment line and the expression."""
    import os
    import tempfile

    parse_expression(text)
    path = Path(path)
    if path.exists() and not overwrite:
        raise MedcamError(f"'{path}' exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write("# medcam SyCAM expression (see medcam.sycam); use with: medcam explain -M synth:FILE\n")
        f.write(text + "\n")
    os.replace(tmp, path)
    return path


def load_expression(path: str | Path) -> str:
    """The expression text of a file written by :func:`save_expression` (``#`` lines are comments)."""
    p = Path(path)
    if not p.is_file():
        raise MedcamError(f"expression file '{p}' does not exist (write one with SynthesizedCAM.save)")
    lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if len(lines) != 1:
        raise ExpressionError(f"'{p}' must hold exactly one expression line (found {len(lines)})")
    parse_expression(lines[0])
    return lines[0]


def fingerprint(expr: Expr, envs: list[dict[str, Any]]) -> tuple | None:
    """Values on random inputs, normalised by positive scale (maps are compared up to a positive factor), rounded;
    None for expressions that are non-finite, zero, or divide by zero everywhere on them."""
    parts = []
    for env in envs:
        zero_div: list[bool] = []
        v = expr.evaluate(env, zero_div) if expr.kind == "elementwise" else pooled_alpha(expr, env)
        if zero_div:
            return None
        v = torch.as_tensor(v, dtype=torch.float64)
        if expr.kind == "elementwise":
            v = v.sum(1)
        parts.append(v.flatten())
    x = torch.cat(parts)
    if not bool(torch.isfinite(x).all()):
        return None
    norm = float(x.norm())
    if norm == 0 or not math.isfinite(norm):
        return None
    return tuple(torch.round(x / norm * 1e8).long().tolist())
