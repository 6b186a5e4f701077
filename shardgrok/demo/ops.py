"""Operations mod a prime, given as formulas: ``"x*y"``, ``"x+y"``, ``"x-y"``, ``"x/y"``,
``"x**2+x*y+y**2"``, or in more variables, ``"a*c+b*d-e"``...

A formula is parsed with :mod:`ast` and only these are accepted: variables (single lowercase
letters), non-negative integer literals, ``+ - * /``, ``**`` with a non-negative integer literal
exponent, unary minus and parentheses. Evaluation is exact integer arithmetic mod p, and ``/`` is the
modular inverse, so ``a / b`` is ``a * b^(p-2)`` (a formula that divides needs p prime). A pair whose divisor is 0
mod p has no answer and is left out of the task, as in Power et al.'s division tasks.

The operands are ``x`` and ``y`` when the formula names no other letter (so ``"x*x"`` is still a
task over every pair); otherwise they are the letters the formula names, in alphabetical order
(``"a*c+b*d-e"`` takes five: a, b, c, d, e).
"""
from __future__ import annotations

import ast

import torch

_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**"}
MAX_EXPONENT = 64


def is_prime(p: int) -> bool:
    if p < 2:
        return False
    return all(p % d for d in range(2, int(p ** 0.5) + 1))


class Op:
    """A parsed formula: ``op(*operands)`` on int64 tensors of residues, one per name of
    :attr:`variables` in that order, gives ``(value, defined)``."""

    def __init__(self, formula: str, p: int):
        if not isinstance(formula, str) or not formula.strip():
            raise ValueError("op must be a formula, e.g. 'x*y', 'x/y' or 'a*c+b*d-e'; got "
                             f"{formula!r}")
        if not isinstance(p, int) or p < 2:
            raise ValueError(f"p must be an integer >= 2, got {p!r}")
        self.formula = formula.strip()
        self.p = p
        try:
            tree = ast.parse(self.formula, mode="eval")
        except SyntaxError as e:
            raise ValueError(f"op {formula!r} is not a formula: {e.msg} at column "
                             f"{e.offset}") from None
        self._check(tree.body)
        if any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div) for n in ast.walk(tree.body)) \
                and not is_prime(p):
            raise ValueError(f"op {formula!r} divides, which needs p prime (every nonzero residue "
                             f"invertible); got p = {p}")
        self._tree = tree.body
        self.uses = {n.id for n in ast.walk(tree.body) if isinstance(n, ast.Name)}
        self.variables = ("x", "y") if self.uses <= {"x", "y"} else tuple(sorted(self.uses))

    def _check(self, node: ast.AST) -> None:
        where = f"op {self.formula!r}"
        if isinstance(node, ast.BinOp):
            if type(node.op) not in _BINOPS:
                raise ValueError(f"{where}: operator {type(node.op).__name__} is not allowed "
                                 "(use + - * / and ** with an integer exponent)")
            self._check(node.left)
            if isinstance(node.op, ast.Pow):
                e = node.right
                if not (isinstance(e, ast.Constant) and type(e.value) is int
                        and 0 <= e.value <= MAX_EXPONENT):
                    raise ValueError(f"{where}: the exponent of ** must be an integer literal in "
                                     f"[0, {MAX_EXPONENT}]")
                return
            self._check(node.right)
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, (ast.USub, ast.UAdd)):
                raise ValueError(f"{where}: only unary minus is allowed")
            self._check(node.operand)
        elif isinstance(node, ast.Name):
            if not (len(node.id) == 1 and "a" <= node.id <= "z"):
                raise ValueError(f"{where}: unknown name {node.id!r} (operands are single "
                                 "lowercase letters: x and y, or a, b, c, ...)")
        elif isinstance(node, ast.Constant):
            if type(node.value) is not int or node.value < 0:
                raise ValueError(f"{where}: constants must be non-negative integers, got "
                                 f"{node.value!r}")
        else:
            raise ValueError(f"{where}: {type(node).__name__} is not allowed (only variables, "
                             "integers, + - * / ** and parentheses)")

    def __call__(self, *operands: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(operands) != len(self.variables):
            raise ValueError(f"op {self.formula!r} takes {len(self.variables)} operands "
                             f"({', '.join(self.variables)}), got {len(operands)}")
        p = self.p
        env = dict(zip(self.variables, operands))
        x = operands[0]
        defined = torch.ones_like(x, dtype=torch.bool)

        def pow_mod(base: torch.Tensor, e: int) -> torch.Tensor:
            out = torch.ones_like(base)
            b = base % p
            while e:
                if e & 1:
                    out = out * b % p
                b = b * b % p
                e >>= 1
            return out

        def ev(node) -> torch.Tensor:
            nonlocal defined
            if isinstance(node, ast.Name):
                return env[node.id] % p
            if isinstance(node, ast.Constant):
                return torch.full_like(x, node.value % p)
            if isinstance(node, ast.UnaryOp):
                v = ev(node.operand)
                return (-v) % p if isinstance(node.op, ast.USub) else v
            a = ev(node.left)
            if isinstance(node.op, ast.Pow):
                return pow_mod(a, node.right.value)
            b = ev(node.right)
            if isinstance(node.op, ast.Add):
                return (a + b) % p
            if isinstance(node.op, ast.Sub):
                return (a - b) % p
            if isinstance(node.op, ast.Mult):
                return a * b % p
            defined = defined & (b != 0)
            return a * pow_mod(b, p - 2) % p  # Fermat: b^(p-2) is b's inverse mod a prime

        value = ev(self._tree)
        return value, defined


def parse_op(formula: str, p: int) -> Op:
    """The formula as an :class:`Op` (raises ValueError naming what is wrong)."""
    return Op(formula, p)
