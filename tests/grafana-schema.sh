#!/usr/bin/env bash
# Checks grafana/dashboards/*.json against Grafana's own dashboard schema: the `Dashboard` type of
# the npm package @grafana/schema (raw/dashboard/x, the classic JSON model that provisioning
# loads), turned into a JSON schema by ts-json-schema-generator, checked with python3 jsonschema.
#
#   tests/grafana-schema.sh            (called by tests/tests/observability.rs, ignored test)
#
# The package ships TypeScript types only, no JSON schema, and no Grafana server is available
# from the registries this project reaches, so this is the nearest check to loading the
# dashboards in Grafana. The types are stricter than Grafana itself, which accepts and writes
# more (`__inputs`, `__requires`, a variable's `definition`, `current: {}`, `allValue: null`):
# the check is relaxed accordingly, it checks the type and enum of every property the schema
# knows, at every depth (panels, targets, gridPos, fieldConfig, templating, ...), and null for an
# optional property (Grafana's backend reads null as unset); it does not require properties or
# reject unknown ones. A self-check first makes sure a broken copy fails.
#
# Needs npm (the registry) the first time and python3 with jsonschema (python3-jsonschema or
# `pip install jsonschema`). The schema is cached in RAFTSAN_GRAFANA_SCHEMA_DIR (default:
# <cargo target dir>/grafana-schema).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCHEMA_PKG=@grafana/schema@13.2.3
GENERATOR=ts-json-schema-generator@2.4.0
CACHE="${RAFTSAN_GRAFANA_SCHEMA_DIR:-${CARGO_TARGET_DIR:-$REPO/build}/grafana-schema}"
SCHEMA="$CACHE/dashboard-${SCHEMA_PKG##*@}.schema.json"

die() {
    echo "grafana-schema: $*" >&2
    exit 1
}

python3 -c 'import jsonschema' 2>/dev/null ||
    die "python3 jsonschema missing (apt-get install python3-jsonschema, or pip install jsonschema)"
if [[ ! -s "$SCHEMA" ]]; then
    command -v npm >/dev/null || die "npm missing (apt-get install npm): needed once to fetch $SCHEMA_PKG"
    mkdir -p "$CACHE"
    work=$(mktemp -d "$CACHE/work.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && npm pack --silent "$SCHEMA_PKG" >/dev/null && tar xzf ./*.tgz) ||
        die "npm pack $SCHEMA_PKG failed"
    types="$work/package/dist/types/raw/dashboard/x/types.gen.d.ts"
    [[ -s "$types" ]] || die "$SCHEMA_PKG has no $types"
    (cd "$work" && npm exec --yes --package="$GENERATOR" -- ts-json-schema-generator --path "$types" \
        --type Dashboard --no-type-check -o "$work/schema.json" >/dev/null) || die "$GENERATOR failed"
    mv "$work/schema.json" "$SCHEMA"
fi

python3 - "$SCHEMA" "$REPO"/grafana/dashboards/*.json <<'EOF'
import copy, json, sys
import jsonschema

def relax(node):
    """Grafana accepts more than its TypeScript types: no required properties, unknown properties
    allowed, null allowed for every optional property. `node` is a schema."""
    if not isinstance(node, dict):
        return
    required = set(node.pop("required", []))
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]
    props = node.get("properties", {})
    for name in props:
        if name not in required:
            props[name] = {"anyOf": [{"type": "null"}, props[name]]}
    for key, value in node.items():
        if key in ("properties", "definitions", "patternProperties"):
            for sub in value.values():
                relax(sub)
        elif isinstance(value, dict):
            relax(value)
        elif isinstance(value, list):
            for sub in value:
                relax(sub)

schema = json.load(open(sys.argv[1]))
relax(schema)
validator = jsonschema.Draft7Validator(schema)

def problems(dashboard):
    out = []
    for e in validator.iter_errors(dashboard):
        # anyOf (a panel is a Panel or a RowPanel): the reasons of the closest alternative.
        best = jsonschema.exceptions.best_match([e])
        out.append("/".join(map(str, best.absolute_path)) + ": " + best.message[:300])
    return out

failed = False
dashboards = {path: json.load(open(path)) for path in sys.argv[2:]}
if not dashboards:
    sys.exit("grafana-schema: no dashboards")
# Self-check: a copy with a wrong type deep in a panel must fail.
broken = copy.deepcopy(next(iter(dashboards.values())))
broken["panels"][0]["gridPos"]["h"] = "eight"
if not problems(broken):
    sys.exit("grafana-schema: the relaxed schema accepts a panel with gridPos.h = \"eight\"")
for path, dashboard in dashboards.items():
    found = problems(dashboard)
    print(f"{path}: {len(found)} problem(s)")
    for p in found:
        print("   ", p)
    failed |= bool(found)
sys.exit(1 if failed else 0)
EOF
