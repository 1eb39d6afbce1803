"""Filters and sort fields of the list calls and of events, written as in the official ``armonik`` package.

A filter is never built directly: the class attributes of ``Task``, ``Result``, ``Session`` and
``Partition`` give the field filters, and comparisons and ``contains``/``startswith``/``endswith``
make conditions of them::

    (Task.status == TaskStatus.COMPLETED) & (Task.options["team"] == "a")
    (Result.result_id == "a") | (Result.result_id == "b")
    ~Result.name.contains("tmp")

Combinations are kept in disjunctive normal form, which is also the wire's form: ``to_dnf()``
returns a list (OR) of lists (AND) of ``[field, operator, value]``. Dates travel as float seconds
since the epoch (a naive datetime is taken as UTC, as protobuf does), durations as float seconds.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from enum import IntEnum
from typing import Any, Dict, List, Optional, Tuple

from ..common import Partition, Result, Session, Task
from ..protocol import FILTER_FIELDS, SORT_ASC, SORT_DESC

__all__ = [
    "Direction", "Filter", "FilterError", "StringFilter", "StatusFilter", "DateFilter", "NumberFilter",
    "BooleanFilter", "ArrayFilter", "DurationFilter", "FilterWrapper", "TaskFilter", "TaskOptionFilter",
    "GenericTaskOptionsFilter", "SessionFilter", "SessionTaskOptionFilter", "ResultFilter", "PartitionFilter",
    "OutputFilter",
]


class Direction(IntEnum):
    """Sort direction of the list calls (ArmoniK's SortDirection numbers)."""

    ASC = SORT_ASC
    DESC = SORT_DESC


class FilterError(ValueError):
    """A filter that cannot be built or used as asked."""

    def __init__(self, filter_instance: Optional["Filter"], message: str):
        super().__init__(message)
        self.filter = filter_instance
        self.message = message

    def __str__(self) -> str:
        return f"Filter: {self.filter} Error: {self.message}"


class Filter:
    """A condition on one field, or a combination of conditions in disjunctive normal form.

    ``field`` is the wire field name (``None`` for a combination, whose ``value`` is the list of
    AND clauses), ``entity`` what is filtered ("task", "session", "result", "partition").
    """

    eq_: Optional[str] = "eq"
    ne_: Optional[str] = "ne"
    lt_: Optional[str] = None
    le_: Optional[str] = None
    gt_: Optional[str] = None
    ge_: Optional[str] = None
    contains_: Optional[str] = None
    notcontains_: Optional[str] = None

    def __init__(self, field: Optional[str], entity: str, operator: Optional[str] = None, value: Any = None):
        self.field = field
        self.entity = entity
        self.operator = operator
        self.value = value

    # -- combinations (kept in disjunctive normal form) --------------------------------------

    def _disjunction(self, clauses: List[List["Filter"]]) -> "Filter":
        return Filter(None, self.entity, None, clauses)

    def _is_disjunction(self) -> bool:
        return self.field is None

    def _is_empty(self) -> bool:
        return self.value is None or (isinstance(self.value, list) and (
            len(self.value) == 0 or (isinstance(self.value[0], list) and len(self.value[0]) == 0)))

    def _check_compatible(self, other: Any) -> None:
        if not isinstance(other, Filter):
            raise ValueError(f"{self} is not compatible with {other} as the latter is not a Filter")
        if other.entity != self.entity:
            raise ValueError(f"{self} is not compatible with {other} as they apply to different object types")

    def to_disjunction(self) -> "Filter":
        """Return this filter as a combination (OR of ANDs); raise FilterError if it has no condition."""
        if self._is_empty():
            raise FilterError(self, "Empty filter")
        if self.operator is not None:
            return self._disjunction([[self]])
        return self

    def __and__(self, other: "Filter") -> "Filter":
        self._check_compatible(other)
        # (a | b&c) & (d | e&f) = a&d | a&e&f | b&c&d | b&c&e&f
        return self._disjunction([c1 + c2 for c2 in other.to_disjunction().value
                                  for c1 in self.to_disjunction().value])

    def __mul__(self, other: "Filter") -> "Filter":
        return self & other

    def __or__(self, other: "Filter") -> "Filter":
        self._check_compatible(other)
        return self._disjunction(self.to_disjunction().value + other.to_disjunction().value)

    def __add__(self, other: "Filter") -> "Filter":
        return self | other

    def __invert__(self) -> "Filter":
        if self.operator is None:
            if self._is_empty():
                raise FilterError(self, "Cannot invert filter without a value or operator")
            try:
                # ~(a | b&c) = ~a & (~b | ~c) = ~a&~b | ~a&~c
                inverted = self._disjunction([[~c] for c in self.value[0]])
                for conj in self.value[1:]:
                    inverted &= self._disjunction([[~c] for c in conj])
                return inverted
            except FilterError as exc:
                raise FilterError(self, f"Could not invert because of an error in subfilter inversion : {exc}")
        cls = self.__class__
        opposites = [(cls.eq_, cls.ne_), (cls.lt_, cls.ge_), (cls.le_, cls.gt_), (cls.contains_, cls.notcontains_)]
        for a, b in opposites:
            if a is not None and b is not None:
                if self.operator == a:
                    return self._change_operation(self.value, b, "", True)
                if self.operator == b:
                    return self._change_operation(self.value, a, "", True)
        raise FilterError(self, f"{cls.__name__} operator {self.operator} for field {self.field} has no inverted "
                                f"equivalent")

    def __neg__(self) -> "Filter":
        return ~self

    def __xor__(self, other: "Filter") -> "Filter":
        return (self & (~other)) | ((~self) & other)

    # -- conditions ------------------------------------------------------------------------

    def __eq__(self, value: Any) -> "Filter":  # type: ignore[override]
        return self._change_operation(value, self.__class__.eq_, "==")

    def __ne__(self, value: Any) -> "Filter":  # type: ignore[override]
        return self._change_operation(value, self.__class__.ne_, "!=")

    def __lt__(self, value: Any) -> "Filter":
        return self._change_operation(value, self.__class__.lt_, "<")

    def __le__(self, value: Any) -> "Filter":
        return self._change_operation(value, self.__class__.le_, "<=")

    def __gt__(self, value: Any) -> "Filter":
        return self._change_operation(value, self.__class__.gt_, ">")

    def __ge__(self, value: Any) -> "Filter":
        return self._change_operation(value, self.__class__.ge_, ">=")

    def contains(self, value: Any) -> "Filter":
        """Return the condition "the field contains ``value``" (a substring, or an item of an array)."""
        return self._change_operation(value, self.__class__.contains_, "contains")

    def _sanitize_value(self, value: Any) -> Any:
        """Return ``value`` in its wire form, or raise FilterError if the field cannot take it."""
        return value

    def _wrong_type(self, value: Any, expected: str) -> FilterError:
        return FilterError(self, f"Expected value type '{expected}' for field '{self.field}', "
                                 f"got '{type(value).__name__}' instead")

    def _change_operation(self, value: Any, operator: Optional[str], operator_str: str = "",
                          override: bool = False) -> "Filter":
        if not override and self.value is not None:
            cls = self.__class__
            if isinstance(value, bool):
                if operator == cls.eq_ and cls.eq_ is not None:
                    return self if value else ~self
                if operator == cls.ne_ and cls.ne_ is not None:
                    return ~self if value else self
            if self._is_disjunction():
                raise FilterError(self, "Cannot apply operator to a filter combination")
            raise FilterError(self, "Cannot apply operator to an already defined filter")
        if operator is None or self._is_disjunction():
            raise FilterError(self, f"Operator {operator_str} is not available for {self.__class__.__name__}.")
        return self.__class__(self.field, self.entity, operator, self._sanitize_value(value))

    def __bool__(self) -> bool:
        raise FilterError(self, "Filters cannot be transformed into booleans. You may see this error if you try to "
                                "combine filters with 'or', 'and', 'in', or 'not'. Use '|', '&', '.contains' or '~' "
                                "instead.")

    # -- output ----------------------------------------------------------------------------

    @property
    def field_name(self) -> Optional[str]:
        return self.field

    def to_dnf(self) -> list:
        """Return the wire form: a list (OR) of lists (AND) of ``[field, operator, value]`` (empty: no filter)."""
        if self._is_disjunction() and self._is_empty():
            return []
        return [[[f.field, f.operator, f.value] for f in conj] for conj in self.to_disjunction().value]

    def to_dict(self) -> Dict[str, Any]:
        """Describe the filter as nested dicts ``{"or": [{"and": [...]}]}`` (for display)."""
        if not self._is_disjunction() or self.value is None:
            return {"field": str(self.field), "value": str(self.value), "operator": str(self.operator)}
        if self._is_empty():
            return {}
        conjunctions = [{"and": [c.to_dict() for c in conj]} if len(conj) > 1 else conj[0].to_dict()
                        for conj in self.value]
        return {"or": conjunctions} if len(conjunctions) > 1 else conjunctions[0]

    def __str__(self) -> str:
        return json.dumps(self.to_dict())

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self})"


class StringFilter(Filter):
    """Conditions on a string field: ==, !=, contains, startswith, endswith (and their negations with ~)."""

    contains_ = "contains"
    notcontains_ = "notcontains"

    def _sanitize_value(self, value: Any) -> Any:
        if not isinstance(value, str):
            raise self._wrong_type(value, "str")
        return value

    def startswith(self, value: str) -> "Filter":
        return self._change_operation(value, "startswith", "startswith")

    def endswith(self, value: str) -> "Filter":
        return self._change_operation(value, "endswith", "endswith")


class StatusFilter(Filter):
    """Conditions on a status field: == and !=."""

    def _sanitize_value(self, value: Any) -> Any:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._wrong_type(value, "status")
        return int(value)


class _OrderedFilter(Filter):
    lt_ = "lt"
    le_ = "le"
    gt_ = "gt"
    ge_ = "ge"


class NumberFilter(_OrderedFilter):
    """Conditions on an integer field: == != < <= > >=."""

    def _sanitize_value(self, value: Any) -> Any:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._wrong_type(value, "int")
        return int(value)


class DateFilter(_OrderedFilter):
    """Conditions on a date field: == != < (before) <= > (after) >=."""

    def _sanitize_value(self, value: Any) -> Any:
        if not isinstance(value, datetime):
            raise self._wrong_type(value, "datetime")
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.timestamp()


class DurationFilter(_OrderedFilter):
    """Conditions on a duration field: == != < (shorter) <= > (longer) >=."""

    def _sanitize_value(self, value: Any) -> Any:
        if not isinstance(value, timedelta):
            raise self._wrong_type(value, "timedelta")
        return value.total_seconds()


class ArrayFilter(Filter):
    """Conditions on an array of strings: contains (and ~ for does not contain)."""

    eq_ = None
    ne_ = None
    contains_ = "contains"
    notcontains_ = "notcontains"

    def _sanitize_value(self, value: Any) -> Any:
        if not isinstance(value, str):
            raise self._wrong_type(value, "str")
        return value


class BooleanFilter(Filter):
    """A boolean field: the filter itself means "is true"; ``~f`` or ``f == False`` means "is false"."""

    eq_ = "is"
    ne_ = None

    def __init__(self, field: Optional[str], entity: str, operator: Optional[str] = "is", value: Any = True):
        super().__init__(field, entity, operator, value)

    def _sanitize_value(self, value: Any) -> Any:
        if not isinstance(value, bool):
            raise self._wrong_type(value, "bool")
        return value

    def __ne__(self, value: bool) -> "Filter":  # type: ignore[override]
        return self._change_operation(not value, "is", "!=", True)

    def __invert__(self) -> "Filter":
        return self._change_operation(not self.value, "is", "==", True)


_KINDS = {"string": StringFilter, "status": StatusFilter, "number": NumberFilter, "date": DateFilter,
          "duration": DurationFilter, "array": ArrayFilter, "boolean": BooleanFilter}
#: Marks an attribute that exists but cannot be filtered on.
_NA = "na"


def _fields(entity: str, renamed: Dict[str, str], not_available: Tuple[str, ...],
            elsewhere: Tuple[str, ...] = ()) -> Dict[str, Tuple[str, str]]:
    """Map attribute names to (kind, wire field), from the wire's table of the entity.

    ``renamed``: attribute -> wire field where they differ; ``not_available``: attributes that cannot be
    filtered on; ``elsewhere``: wire fields reached through a nested attribute (TaskOptions, output).
    """
    attribute = {wire: attr for attr, wire in renamed.items()}
    table = {attribute.get(wire, wire): (kind, wire) for wire, kind in FILTER_FIELDS[entity].items()
             if not wire.startswith("options.") and wire not in elsewhere}
    table.update({attr: (_NA, attr) for attr in not_available})
    return table


class FilterWrapper(Filter):
    """The empty filter of an entity (no condition), which hands out its field filters by attribute name."""

    _entity = ""
    _fields: Dict[str, Tuple[str, str]] = {}

    def __init__(self) -> None:
        super().__init__(None, self._entity)

    def __call__(self, field_name: str) -> Filter:
        """Return the filter on the attribute ``field_name``."""
        kind, wire = self.__class__._fields.get(field_name, ("", field_name))
        if not kind:
            raise ValueError(f"Unknown field {field_name}")
        if kind == _NA:
            raise FilterError(None, f"Field {field_name} is not available as a filter")
        return _KINDS[kind](wire, self._entity)


class TaskFilter(FilterWrapper):
    _entity = "task"
    _fields = _fields("task", {"id": "task_id"}, (
        "parent_task_ids", "data_dependencies", "expected_output_ids", "retry_of_ids", "status_message", "options",
        "output"), elsewhere=("error",))


class OutputFilter(FilterWrapper):
    """``Task.output``: its ``error`` message."""

    _entity = "task"
    _fields = {"error": ("string", "error")}

    @property
    def error(self) -> StringFilter:
        return self("error")  # type: ignore[return-value]


class GenericTaskOptionsFilter(FilterWrapper):
    """``Task.options`` / ``Session.options``: TaskOptions fields as properties, ``options[key]`` by subscript."""

    _fields = {name[len("options."):]: (kind, name) for name, kind in FILTER_FIELDS["task"].items()
               if name.startswith("options.")}

    def __getitem__(self, key: str) -> StringFilter:
        """Return the filter on the value of ``key`` in TaskOptions.options."""
        return StringFilter(f"options[{key}]", self._entity)

    @property
    def max_duration(self) -> DurationFilter:
        return self("max_duration")  # type: ignore[return-value]

    @property
    def max_retries(self) -> NumberFilter:
        return self("max_retries")  # type: ignore[return-value]

    @property
    def priority(self) -> NumberFilter:
        return self("priority")  # type: ignore[return-value]

    @property
    def partition_id(self) -> StringFilter:
        return self("partition_id")  # type: ignore[return-value]

    @property
    def application_name(self) -> StringFilter:
        return self("application_name")  # type: ignore[return-value]

    @property
    def application_namespace(self) -> StringFilter:
        return self("application_namespace")  # type: ignore[return-value]

    @property
    def application_version(self) -> StringFilter:
        return self("application_version")  # type: ignore[return-value]

    @property
    def application_service(self) -> StringFilter:
        return self("application_service")  # type: ignore[return-value]

    @property
    def engine_type(self) -> StringFilter:
        return self("engine_type")  # type: ignore[return-value]


class TaskOptionFilter(GenericTaskOptionsFilter):
    _entity = "task"


class SessionTaskOptionFilter(GenericTaskOptionsFilter):
    _entity = "session"


class SessionFilter(FilterWrapper):
    _entity = "session"
    _fields = _fields("session", {}, ("options",))


class ResultFilter(FilterWrapper):
    _entity = "result"
    _fields = _fields("result", {}, ("opaque_id",))


class PartitionFilter(FilterWrapper):
    _entity = "partition"
    _fields = _fields("partition", {}, ("pod_configuration",))


_WRAPPERS: Dict[type, FilterWrapper] = {Task: TaskFilter(), Session: SessionFilter(), Result: ResultFilter(),
                                        Partition: PartitionFilter()}
#: Attributes whose filter is a wrapper of its own (``Task.options["key"]``, ``Task.output.error``).
_NESTED = {(Task, "options"): TaskOptionFilter, (Task, "output"): OutputFilter,
           (Session, "options"): SessionTaskOptionFilter}


def field_filter(owner: type, name: str) -> Filter:
    """Return the filter of the attribute ``name`` of a record class (what ``Task.status`` evaluates to)."""
    for cls in owner.__mro__:
        nested = _NESTED.get((cls, name))
        if nested is not None:
            return nested()
        wrapper = _WRAPPERS.get(cls)
        if wrapper is not None:
            return wrapper(name)
    raise ValueError(f"{owner.__name__} has no filters")


def to_wire_filter(filter: Any, entity: str, name: str) -> Optional[list]:
    """Return a filter (a ``Filter``, or already a list in disjunctive normal form) in its wire form.

    Raises:
        FilterError: the filter is about another kind of object (a ``Result`` filter given for tasks).
        TypeError: ``filter`` is neither.
    """
    if filter is None:
        return None
    if isinstance(filter, Filter):
        if filter.entity != entity:
            raise FilterError(filter, f"{name} must filter {entity}s, not {filter.entity}s")
        return filter.to_dnf()
    if isinstance(filter, (list, tuple)):
        return [[list(term) for term in clause] for clause in filter]
    raise TypeError(f"{name} must be a filter such as {entity.capitalize()}.status == ..., or a list (OR) of lists "
                    f"(AND) of [field, operator, value]; got {type(filter).__name__}")


def to_wire_sort(sort_field: Any, sort_direction: Any, entity: str) -> dict:
    """Return the wire's ``sort`` of a list call: the field of a field filter (``Task.id``) and the direction."""
    if not isinstance(sort_field, Filter) or sort_field.field is None:
        raise FilterError(sort_field if isinstance(sort_field, Filter) else None,
                          f"sort_field must be a field such as {entity.capitalize()}.status, got {sort_field!r}")
    if sort_field.entity != entity:
        raise FilterError(sort_field, f"sort_field must be a field of {entity}s, not of {sort_field.entity}s")
    return {"field": sort_field.field, "direction": int(Direction(sort_direction))}
