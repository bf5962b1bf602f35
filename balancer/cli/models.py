"""``llmlb models add|list|show|status|rm``: the model catalogue."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from balancer.cli.client import CALL_TIMEOUT_S, add_client_parser
from balancer.cli.output import (
    as_dict,
    capability_names,
    human_bytes,
    node_bytes,
    print_json,
    print_table,
    state_name,
)
from common.pb.llmlb.v1 import registry_pb2 as rpb

if TYPE_CHECKING:
    from balancer.cli.client import Stub


def add_parsers(models: Any) -> None:
    """Adds the catalogue actions under ``llmlb models``."""
    add = add_client_parser(models, "add", "register a Hugging Face repository, pinned to a commit", run)
    add.add_argument("repo_id", help="repository id, e.g. org/name")
    add.add_argument("--file", default="", help="one file of the repo (required if it holds several GGUF)")
    add.add_argument("--revision", default="", help="branch, tag or commit (default main)")
    add.add_argument("--id", default="", help="model id to register under (default: derived from repo)")
    add.add_argument("--origin", default="", help="origin base URL (default: HF_ENDPOINT)")
    add.add_argument("--name", default="", help="display name")
    add_client_parser(models, "list", "list models with their readiness", run)
    add_client_parser(models, "show", "one model with its manifest (JSON)", run).add_argument("model_id")
    add_client_parser(models, "status", "download / readiness state of a model, per node", run).add_argument(
        "model_id"
    )
    add_client_parser(models, "rm", "delete a model; every node deletes its copy", run).add_argument(
        "model_id"
    )


async def run(stub: Stub, args: argparse.Namespace) -> int:
    """Runs one ``llmlb models`` action against ``stub``; returns the exit status."""
    t = CALL_TIMEOUT_S
    if args.action == "add":
        model = await stub.RegisterModel(
            rpb.RegisterModelRequest(
                repo_id=args.repo_id,
                filename=args.file,
                revision=args.revision,
                model_id=args.id,
                origin=args.origin,
                name=args.name,
            ),
            timeout=t,
        )
        if args.json:
            print_json(as_dict(model))
        else:
            files = model.manifest.files
            print_table(
                [
                    ["MODEL", "REVISION", "FILES", "SIZE"],
                    [
                        model.id,
                        model.manifest.revision[:12],
                        str(len(files)),
                        human_bytes(sum(f.size_bytes for f in files)),
                    ],
                ]
            )
    elif args.action == "list":
        listed = await stub.ListModels(rpb.ListModelsRequest(), timeout=t)
        if args.json:
            print_json(as_dict(listed))
        else:
            print_table(
                [["MODEL", "READY", "NODES", "CAPABILITIES", "REPO", "REVISION"]]
                + [
                    [
                        m.id,
                        "yes" if m.ready else "no",
                        f"{sum(n.ready for n in m.nodes)}/{len(m.nodes)}",
                        capability_names(m.capabilities),
                        m.repo_id,
                        m.manifest.revision[:12] or "-",
                    ]
                    for m in listed.models
                ]
            )
    elif args.action == "show":
        print_json(as_dict(await stub.GetModel(rpb.GetModelRequest(model_id=args.model_id), timeout=t)))
    elif args.action == "status":
        st = await stub.GetModelStatus(rpb.GetModelStatusRequest(model_id=args.model_id), timeout=t)
        if args.json:
            print_json(as_dict(st))
        else:
            rows = [
                ["MODEL / NODE", "STATE", "PROGRESS", "BYTES", "ERROR"],
                [
                    st.model_id,
                    state_name(st.status),
                    f"{st.progress:.0%}",
                    f"{human_bytes(st.downloaded_bytes)} / {human_bytes(st.total_bytes)}",
                    "",
                ],
            ]
            for n in st.nodes:
                held, needed = node_bytes(n, st.total_bytes)
                rows.append(
                    [
                        f"  {n.node_id}",
                        state_name(n.state),
                        f"{held / needed if needed else 0.0:.0%}",
                        f"{human_bytes(held)} / {human_bytes(needed)}",
                        n.error,
                    ]
                )
            print_table(rows)
    elif args.action == "rm":
        done = await stub.DeleteModel(rpb.DeleteModelRequest(model_id=args.model_id), timeout=t)
        if args.json:
            print_json(as_dict(done))
        else:
            print(f"deleted {done.model_id}; {done.nodes_notified} node(s) told to delete their copy")
    return 0
