"""Filters and sort keys of the wire, checked once and compiled to plain functions over LMDB rows.

A filter is in disjunctive normal form: a list (OR) of lists (AND) of ``[field, operator, value]``.
Each field is one of ``protocol.FILTER_FIELDS`` for its entity (task, session, result, partition),
and each operator one its kind allows. A field without a value (an unset date, a task without
error) makes every term false except ``ne`` and ``notcontains``, as NULL compares unequal to any value.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from ..protocol import FILTER_FIELDS, FILTER_OPERATORS, SORT_DESC, ErrorCode, ProtocolError, field_kind

Row = dict
Getter = Callable[[Row], Any]
Predicate = Callable[[Row], bool]

#: Python types a value of each kind may have (bool is an int: refused where a number is meant).
_VALUE_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "array": (str,), "status": (int,), "number": (int, float), "date": (int, float),
    "duration": (int, float), "boolean": (bool,),
}


#: Kinds stored as float seconds but shown to clients as datetime/timedelta, whose resolution is the microsecond:
#: compared at the microsecond, so that a filter built from a value read back matches it.
_TIMES = ("date", "duration")


def _span(start: str, end: str) -> Getter:
    def get(row: Row) -> Optional[float]:
        a, b = row.get(start), row.get(end)
        return None if a is None or b is None else b - a
    return get


#: Fields a row does not store but a client may filter and sort on.
_COMPUTED: dict[str, dict[str, Getter]] = {
    "task": {
        "creation_to_end_duration": _span("created_at", "ended_at"),
        "processing_to_end_duration": _span("started_at", "ended_at"),
        "received_to_end_duration": _span("received_at", "ended_at"),
    },
}


def getter(entity: str, field: str) -> Getter:
    """Return the function reading ``field`` (already checked) from a row of ``entity``."""
    if field.startswith("options["):
        key = field[len("options["):-1]
        return lambda row: ((row.get("options") or {}).get("options") or {}).get(key)
    if field.startswith("options."):
        name = field[len("options."):]
        return lambda row: (row.get("options") or {}).get(name)
    computed = _COMPUTED.get(entity, {}).get(field)
    if computed is not None:
        return computed
    return lambda row: row.get(field)


def _known(entity: str) -> str:
    extra = ", options[<key>]" if "options.priority" in FILTER_FIELDS[entity] else ""
    return ", ".join(sorted(FILTER_FIELDS[entity])) + extra


def check_field(entity: str, field: Any, where: str) -> str:
    """Return the kind of ``field``, or refuse it with a message naming it and the known fields."""
    kind = field_kind(entity, field) if type(field) is str else None
    if kind is None:
        raise ProtocolError(ErrorCode.INVALID_ARGUMENT,
                            f"{where}: unknown field {field!r} for {entity}s (known: {_known(entity)})")
    return kind


def _check_term(entity: str, term: Any, where: str) -> tuple[str, str, Any]:
    if type(term) is not list or len(term) != 3:
        raise ProtocolError(ErrorCode.INVALID_ARGUMENT,
                            f"{where}: a term must be [field, operator, value], got {term!r}")
    field, op, value = term
    kind = check_field(entity, field, where)
    allowed = FILTER_OPERATORS[kind]
    if op not in allowed:
        raise ProtocolError(ErrorCode.INVALID_ARGUMENT, f"{where}: operator {op!r} does not apply to the {kind} field "
                            f"{field!r} (allowed: {', '.join(sorted(allowed))})")
    types = _VALUE_TYPES[kind]
    if type(value) not in types or (kind != "boolean" and type(value) is bool):
        raise ProtocolError(ErrorCode.INVALID_ARGUMENT, f"{where}: the value of a {kind} field ({field!r}) must be "
                            f"{' or '.join(t.__name__ for t in types)}, got {type(value).__name__}")
    if kind in _TIMES:
        value = round(value, 6)
    return field, op, value


def _stored_as_is(entity: str, field: str) -> bool:
    """Tell whether a term compares the row's own value (not an option, a computed value, nor a rounded time)."""
    return (field in FILTER_FIELDS[entity] and not field.startswith("options.")
            and field not in _COMPUTED.get(entity, ()) and field_kind(entity, field) not in _TIMES)


def _term_getter(entity: str, field: str) -> Getter:
    """Return the getter a filter term uses: dates and durations at the microsecond, as clients see them."""
    get = getter(entity, field)
    if field_kind(entity, field) in _TIMES:
        return lambda row: None if (v := get(row)) is None else round(v, 6)
    return get


def _predicate(get: Getter, op: str, value: Any) -> Predicate:
    if op == "eq" or op == "is":
        return lambda row: get(row) == value
    if op == "ne":
        return lambda row: get(row) != value
    if op == "lt":
        return lambda row: (v := get(row)) is not None and v < value
    if op == "le":
        return lambda row: (v := get(row)) is not None and v <= value
    if op == "gt":
        return lambda row: (v := get(row)) is not None and v > value
    if op == "ge":
        return lambda row: (v := get(row)) is not None and v >= value
    if op == "contains":
        return lambda row: (v := get(row)) is not None and value in v
    if op == "notcontains":
        return lambda row: (v := get(row)) is None or value not in v
    if op == "startswith":
        return lambda row: (v := get(row)) is not None and v.startswith(value)
    if op == "endswith":
        return lambda row: (v := get(row)) is not None and v.endswith(value)
    raise AssertionError(f"operator {op} passed the check but has no predicate")


def _all(preds: list[Predicate]) -> Predicate:
    if len(preds) == 1:
        return preds[0]
    if len(preds) == 2:
        a, b = preds
        return lambda row: a(row) and b(row)
    return lambda row: all(p(row) for p in preds)


def _any(preds: list[Predicate]) -> Predicate:
    if len(preds) == 1:
        return preds[0]
    return lambda row: any(p(row) for p in preds)


def equalities(dnf: Optional[list], name: str, entity: str) -> Optional[tuple[str, list]]:
    """Return (field, values) if every clause of ``dnf`` is one ``field eq <str>`` term on one field stored as is,
    else None (the general path checks and compiles it). One pass, no object per clause: a wait on 100,000
    results was 100,000 such clauses, whose general check cost ~76 ms."""
    if not dnf:
        return None
    first = dnf[0]
    if not (type(first) is list and len(first) == 1 and type(first[0]) is list and len(first[0]) == 3):
        return None
    field, op, value = first[0]
    if op != "eq" or type(value) is not str or type(field) is not str or not _stored_as_is(entity, field):
        return None
    _check_term(entity, first[0], f"{name}[0][0]")  # the field, its operator and value type: once
    values = []
    append = values.append
    for clause in dnf:
        if type(clause) is not list or len(clause) != 1:
            return None
        term = clause[0]
        if type(term) is not list or len(term) != 3 or term[0] != field or term[1] != "eq":
            return None
        value = term[2]
        if type(value) is not str:
            return None
        append(value)
    return field, values


class Filter:
    """A checked filter of one entity, compiled once; call it on a row.

    One-term ``eq`` clauses on the same field (what waiting on many results sends) become one set
    lookup, so a filter naming 100,000 results costs one hash per row, not 100,000 comparisons.
    """

    __slots__ = ("entity", "clauses", "match", "equal")

    def __init__(self, dnf: Optional[list], name: str, entity: str):
        self.entity = entity
        #: the checked terms, clause by clause (empty: no filter; None: the filter is ``equal``)
        self.clauses: Optional[list[list[tuple[str, str, Any]]]] = []
        #: (field, values) when the filter is nothing but one-term ``field eq value`` clauses on one field stored
        #: as is, with string values: what a wait on many results sends. Then ``clauses`` is None and ``match``
        #: is one set lookup; the values keep the request's order (the snapshot of a subscription follows it).
        self.equal: Optional[tuple[str, list]] = equalities(dnf, name, entity)
        if self.equal is not None:
            self.clauses = None
            field, values = self.equal
            frozen = frozenset(values)
            self.match = lambda row: row.get(field) in frozen
            return
        # A term's check depends only on its field, operator and value type: each combination is checked once
        # (a wait on 100,000 results sends as many terms). Times are rounded: those are checked every time.
        passed: set[tuple] = set()
        for i, clause in enumerate(dnf or ()):
            checked = []
            for j, term in enumerate(clause):
                if (type(term) is list and len(term) == 3 and type(term[0]) is str and type(term[1]) is str
                        and (term[0], term[1], type(term[2])) in passed):
                    checked.append((term[0], term[1], term[2]))
                    continue
                field, op, value = _check_term(entity, term, f"{name}[{i}][{j}]")
                checked.append((field, op, value))
                if field_kind(entity, field) not in _TIMES:
                    passed.add((field, op, type(value)))
            self.clauses.append(checked)
        self.match: Optional[Predicate] = self._compile() if self.clauses else None

    def _compile(self) -> Predicate:
        if any(not clause for clause in self.clauses):
            return lambda row: True  # an empty AND is true, so the OR is
        equal: dict[str, set] = {}
        preds: list[Predicate] = []
        for clause in self.clauses:
            if len(clause) == 1 and clause[0][1] == "eq":
                equal.setdefault(clause[0][0], set()).add(clause[0][2])
            else:
                preds.append(_all([_predicate(_term_getter(self.entity, f), op, v) for f, op, v in clause]))
        for field, values in equal.items():
            frozen = frozenset(values)
            if _stored_as_is(self.entity, field):
                # one dict lookup and one hash per row (waiting on results is this, on every event)
                preds.append(lambda row, field=field, frozen=frozen: row.get(field) in frozen)
            else:
                get = _term_getter(self.entity, field)
                preds.append(lambda row, get=get, frozen=frozen: get(row) in frozen)
        return _any(preds)

    def __call__(self, row: Row) -> bool:
        return self.match is None or self.match(row)

    def pinned(self, field: str) -> Optional[set]:
        """Return the values ``field`` must equal for a row to match (every clause has ``field eq x``), else None."""
        if self.equal is not None:
            return set(self.equal[1]) if self.equal[0] == field else None
        if not self.clauses:
            return None
        values = set()
        for clause in self.clauses:
            value = next((v for f, op, v in clause if f == field and op == "eq"), None)
            if value is None:
                return None
            values.add(value)
        return values

    def only_pins(self, field: str) -> bool:
        """Tell whether the filter is nothing but ``field eq x`` clauses (no other condition to check)."""
        if self.equal is not None:
            return self.equal[0] == field
        return bool(self.clauses) and all(len(c) == 1 and c[0][0] == field and c[0][1] == "eq" for c in self.clauses)


class SortKey:
    """The sort of a List* request: a checked field, its getter, and the direction."""

    __slots__ = ("field", "get", "descending")

    def __init__(self, sort: Optional[dict], entity: str, default: str):
        sort = sort or {}
        self.field = sort.get("field", default)
        check_field(entity, self.field, "sort.field")
        self.get = getter(entity, self.field)
        self.descending = sort.get("direction") == SORT_DESC
