"""The calculator tool's fast path: evaluates arithmetic and a couple of string calls (str.count, len) with a
small ast walker, never running code, so it needs no sandbox; anything else is refused (None)."""
import ast
import math
import operator
import re

_MAX_EXPR_CHARS = 1000
_MAX_INT_BITS = 10_000  # ~3000 digits: big enough for any calculator use, small enough to be instant

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


class _Rejected(Exception):
    pass


def _number(value):
    """Reject values that are too big, complex or not finite, so the next operation stays cheap."""
    if type(value) not in (int, float):  # e.g. (-8) ** 0.5 is complex
        raise _Rejected
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise _Rejected
    if isinstance(value, float) and not math.isfinite(value):
        raise _Rejected
    return value


def _eval_arith(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # not bool, complex or str
        return _number(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval_arith(node.operand)
        return _number(-value if isinstance(node.op, ast.USub) else value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval_arith(node.left), _eval_arith(node.right)
        if isinstance(node.op, ast.Pow):
            # Estimate the size first so 9**9**9 is refused instead of computed.
            if abs(right) > _MAX_INT_BITS:
                raise _Rejected
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() * abs(right) > _MAX_INT_BITS:
                raise _Rejected
        return _number(_BINOPS[type(node.op)](left, right))
    raise _Rejected


def _is_str(node):
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _format(value):
    # An integral float prints as an int (48/2 -> "24") to match how calculator results
    # are written in the training data (e.g. GSM8K's <<48/2=24>>).
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def use_calculator(expr: str) -> str | None:
    """
    Evaluate a calculator expression safely in-process; None if it isn't one we accept.

    Accepted, and nothing else:
      1. Arithmetic: int and float literals (`3`, `2.5`, `1e3`, `1_000`; a comma used as a
         thousands separator, as in `1,234`, is removed first), parentheses, unary `+ -`,
         binary `+ - * / // % **`. No names, calls, attribute access, comparisons, bitwise
         operators, strings or other literals. Every intermediate int is limited to 10,000 bits
         (`**` is checked before computing, so `9**9**9` returns None); non-finite floats,
         division by zero and overflow give None.
      2. Letter counting, as used by the SpellingBee task: `'<string>'.count('<string>')`
         (either quote style, a single positional argument) and `len('<string>')`.
    Expressions longer than 1000 characters give None. The result is the value as str(),
    except that a float with an integral value is shown as an int ("6/3" -> "2").
    """
    if not isinstance(expr, str) or len(expr) > _MAX_EXPR_CHARS:
        return None
    try:
        tree = ast.parse(expr.strip(), mode="eval").body
    except Exception:  # SyntaxError, and also ValueError/RecursionError/MemoryError on weird input
        tree = None
    # String forms are matched on the original text (commas inside literals must survive).
    if isinstance(tree, ast.Call) and len(tree.args) == 1 and not tree.keywords and _is_str(tree.args[0]):
        func, arg = tree.func, tree.args[0].value
        if isinstance(func, ast.Attribute) and func.attr == "count" and _is_str(func.value):
            return str(func.value.value.count(arg))
        if isinstance(func, ast.Name) and func.id == "len":
            return str(len(arg))
        return None
    try:
        tree = ast.parse(re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", expr.strip()), mode="eval").body
        return _format(_eval_arith(tree))
    except Exception:  # _Rejected, SyntaxError, ZeroDivisionError, OverflowError, RecursionError...
        return None
