"""Result data operations beyond upload and download: import, delete, owner (ArmoniK 1.3)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..protocol import ErrorCode, ProtocolError
from ..status import ResultStatus
from .handlers import result_view
from .objects import object_name
from .store import Txn

if TYPE_CHECKING:
    from .server import Broker, Request

_R = ResultStatus


class ResultData:
    """Mixed into ``Broker``: ImportResultsData, DeleteResultsData, GetOwnerTaskId."""

    def handle_import_results_data(self: "Broker", req: "Request", txn: Txn) -> None:
        """Bind files of the object storage to results without data: COMPLETED, dependents released.

        Nothing is copied: reads go to the file, and the broker never deletes it (seed 002, 21.4).
        """
        h = req.header
        storage = self.store.object_storage
        if storage is None:
            raise ProtocolError(ErrorCode.FAILED_PRECONDITION, "this broker has no object storage to import from "
                                                               "(start it with --object-storage DIR)")
        sid = self._open_session(txn, h["session_id"], "import data")["session_id"]
        plans = []
        for i, item in enumerate(h["results"]):
            row = self.state.require_result(txn, item["result_id"], sid)
            if row["status"] != _R.CREATED or any(p[0]["result_id"] == row["result_id"] for p in plans):
                raise ProtocolError(ErrorCode.FAILED_PRECONDITION,
                                    f"results[{i}]: result {row['result_id']} is {_R(row['status']).name}: data can "
                                    f"only be imported once, into a result without data")
            size = storage.size(item["opaque_id"], f"results[{i}].opaque_id")
            plans.append((row, object_name(item["opaque_id"]), size))
        for row, name, size in plans:
            txn.put_reference(row["result_id"], name, size)
            row["opaque_id"] = name.encode()
            self.state.mark_result_completed(txn, row, size, "", req.now)
        req.reply(results=[result_view(row) for row, _, _ in plans])

    def handle_delete_results_data(self: "Broker", req: "Request", txn: Txn) -> None:
        """Delete results' data and keep their metadata (DELETED); already DELETED ones are left as they are."""
        h = req.header
        sid = self.state.require_session(txn, h["session_id"])["session_id"]
        rows = []
        for rid in dict.fromkeys(h["result_ids"]):
            row = self.state.require_result(txn, rid, sid)
            if row["status"] not in (_R.COMPLETED, _R.DELETED):
                raise ProtocolError(ErrorCode.FAILED_PRECONDITION,
                                    f"result {rid} is {_R(row['status']).name}: it has no data to delete")
            rows.append(row)
        for row in rows:
            if row["status"] == _R.COMPLETED:
                self.state.delete_result_data(txn, row)
        req.reply(result_ids=[row["result_id"] for row in rows])

    def handle_get_owner_task_id(self: "Broker", req: "Request", txn: Txn) -> None:
        """Return, for each result, the task responsible for producing it ("" if none)."""
        h = req.header
        sid = self.state.require_session(txn, h["session_id"])["session_id"]
        req.reply(owners=[[rid, self.state.require_result(txn, rid, sid)["owner_task_id"]] for rid in h["result_ids"]])
