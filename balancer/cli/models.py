"""``llmlb models add|list|show|status|rm|deploy|undeploy|explain``: the model catalogue and the
deployments the scheduler keeps running."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from balancer.cli.client import CALL_TIMEOUT_S, add_client_parser
from balancer.cli.output import (
    as_dict,
    capability_names,
    node_bytes,
    print_json,
    state_name,
)
from common.console_output import human_bytes, print_table
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
    deploy = add_client_parser(models, "deploy", "keep copies of a model loaded on the fleet", run)
    deploy.add_argument("model_id")
    deploy.add_argument("--replicas", type=int, help="a fixed number of copies (default 1)")
    deploy.add_argument(
        "--min", type=int, dest="min_copies", help="autoscaled: the fewest copies (0 allowed)"
    )
    deploy.add_argument("--max", type=int, dest="max_copies", help="autoscaled: the most copies")
    deploy.add_argument(
        "--selector",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a node label every copy's node has",
    )
    deploy.add_argument("--memory-mb", type=int, help="the memory one copy takes (default: the estimate)")
    add_client_parser(
        models, "undeploy", "end a deployment: its copies unload, files stay", run
    ).add_argument("model_id")
    add_client_parser(
        models, "explain", "where the next copy would go: every node's rank or why it is excluded", run
    ).add_argument("model_id")


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
        deployed = await stub.ListDeployments(rpb.ListDeploymentsRequest(), timeout=t)
        copies = {d.model_id: f"{d.ready_copies}/{d.desired_copies}" for d in deployed.deployments}
        if args.json:
            print_json({**as_dict(listed), **as_dict(deployed)})
        else:
            print_table(
                [["MODEL", "READY", "NODES", "DEPLOYED", "CAPABILITIES", "REPO", "REVISION"]]
                + [
                    [
                        m.id,
                        "yes" if m.ready else "no",
                        f"{sum(n.ready for n in m.nodes)}/{len(m.nodes)}",
                        copies.get(m.id, "-"),
                        capability_names(m.capabilities),
                        m.repo_id,
                        m.manifest.revision[:12] or "-",
                    ]
                    for m in listed.models
                ],
                status_columns=["READY"],
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
            print_table(rows, status_columns=["STATE"])
    elif args.action == "rm":
        done = await stub.DeleteModel(rpb.DeleteModelRequest(model_id=args.model_id), timeout=t)
        if args.json:
            print_json(as_dict(done))
        else:
            print(f"deleted {done.model_id}; {done.nodes_notified} node(s) told to delete their copy")
    elif args.action in ("deploy", "undeploy", "explain"):
        return await _deployments(stub, args)
    return 0


def _selector(items: list[str]) -> dict[str, str]:
    selector: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise SystemExit(f"error: --selector {item!r} is not key=value")
        selector[key.strip()] = value.strip()
    return selector


async def _deployments(stub: Stub, args: argparse.Namespace) -> int:
    t = CALL_TIMEOUT_S
    if args.action == "deploy":
        if args.replicas is not None and (args.min_copies is not None or args.max_copies is not None):
            raise SystemExit("error: give --replicas, or --min and --max, not both")
        d = rpb.Deployment(
            model_id=args.model_id, selector=_selector(args.selector), memory_mb=args.memory_mb or 0
        )
        if args.max_copies is not None:
            d.max_copies = args.max_copies
            d.min_copies = args.min_copies or 0
        elif args.min_copies is not None:
            raise SystemExit("error: --min needs --max")
        else:
            d.copies = 1 if args.replicas is None else args.replicas
        done = await stub.SetDeployment(rpb.SetDeploymentRequest(deployment=d), timeout=t)
        if args.json:
            print_json(as_dict(done))
        else:
            wanted = str(done.copies) if done.HasField("copies") else f"{done.min_copies}..{done.max_copies}"
            print(f"deployed {done.model_id}: {wanted} copies; {done.ready_copies} ready now")
    elif args.action == "undeploy":
        gone = await stub.DeleteDeployment(rpb.DeleteDeploymentRequest(model_id=args.model_id), timeout=t)
        if args.json:
            print_json(as_dict(gone))
        else:
            print(f"undeployed {gone.model_id}; its copies unload, their files stay")
    else:
        found = await stub.ExplainDeployment(rpb.ExplainDeploymentRequest(model_id=args.model_id), timeout=t)
        if args.json:
            print_json(as_dict(found))
        else:
            print(f"{found.model_id}: {found.active} of {found.target} copies placed")
            for node in found.nodes:
                print(f"  {node.text}")
            for decision in found.decisions:
                print(f"  - {decision}")
    return 0
