// Validates Kubernetes objects against their schemas, for tests/deploy/schemas.rs.
//
// Usage: node validate.mjs <node_modules dir>  < objects.json
//
// stdin holds a JSON array of {"source": "<where it came from>", "object": {...}}.
// stdout gets one JSON line per object: {"source", "apiVersion", "kind", "name",
// "validator", "errors": [...]}. Exit status: 0 when every object is valid,
// 1 when any is invalid or has no validator, 2 on a usage error.
//
// Why these validators:
// - Built-in kinds use the `kubernetes-models` package (Kubernetes OpenAPI
//   schemas compiled to ajv validators); CRDs use `@kubernetes-models/
//   prometheus-operator` (ServiceMonitor, PrometheusRule) and
//   `@kubernetes-models/istio` (PeerAuthentication, AuthorizationPolicy).
// - KServe has no `@kubernetes-models/*` package (checked with `npm view
//   @kubernetes-models/kserve`: 404), so InferenceService is checked with the
//   JSON schema in schemas/, written from KServe's CRD and Go types; the
//   Kubernetes types it embeds are checked by the kubernetes-models
//   validators through the `k8sSchema` keyword below.
// - An object whose apiVersion/kind has no validator is an error, never
//   skipped: a new kind must come with its validator.
// - Unknown fields are errors too (see unknownFieldErrors below).
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const nodeModules = process.argv[2];
if (!nodeModules) {
  console.error("usage: node validate.mjs <node_modules dir> < objects.json");
  process.exit(2);
}
const here = new URL(".", import.meta.url);

function importFrom(relativePath) {
  return import(pathToFileURL(join(nodeModules, relativePath)).href);
}

// apiVersion group → module directory holding one index.js per version.
const crdModules = {
  "monitoring.coreos.com": "@kubernetes-models/prometheus-operator/monitoring.coreos.com",
  "security.istio.io": "@kubernetes-models/istio/security.istio.io",
  "networking.istio.io": "@kubernetes-models/istio/networking.istio.io",
};

// Kinds checked with a JSON schema of ours (no kubernetes-models package).
const jsonSchemas = {
  "serving.kserve.io/v1beta1/InferenceService": "schemas/inferenceservice.serving.kserve.io.v1beta1.json",
};

const modelCache = new Map();
async function modelClass(apiVersion, kind) {
  const key = `${apiVersion}/${kind}`;
  if (modelCache.has(key)) return modelCache.get(key);
  const slash = apiVersion.lastIndexOf("/");
  const group = slash < 0 ? "" : apiVersion.slice(0, slash);
  let module = null;
  let label;
  if (group in crdModules) {
    label = `${crdModules[group].split("/").slice(0, 2).join("/")} ${apiVersion}`;
    module = await importFrom(`${crdModules[group]}/${apiVersion.slice(slash + 1)}/index.js`).catch(() => null);
  } else {
    label = `kubernetes-models ${apiVersion}`;
    module = await importFrom(`kubernetes-models/${apiVersion}/index.js`).catch(() => null);
  }
  const typeModule = group in crdModules
    ? `${crdModules[group]}/${apiVersion.slice(slash + 1)}/${kind}`
    : `kubernetes-models/${apiVersion}/${kind}`;
  const found = module && module[kind] && module[kind].kind === kind && module[kind].apiVersion === apiVersion
    ? { validate: (object) => new module[kind](object).validate(), label: `${label} ${kind}`, typeModule, typeName: `I${kind}` }
    : null;
  modelCache.set(key, found);
  return found;
}

// Schema names used by the `k8sSchema` keyword resolve to the compiled
// validators that kubernetes-models ships (one module per OpenAPI definition).
async function loadK8sSchemaValidators(schema) {
  const names = new Set();
  (function walk(node) {
    if (Array.isArray(node)) node.forEach(walk);
    else if (node && typeof node === "object") {
      if (typeof node.k8sSchema === "string") names.add(node.k8sSchema);
      Object.values(node).forEach(walk);
    }
  })(schema);
  const validators = new Map();
  for (const name of names) {
    const path = name.startsWith("IoK8sApimachinery")
      ? `@kubernetes-models/apimachinery/_schemas/${name}.js`
      : `kubernetes-models/_schemas/${name}.js`;
    const module = await importFrom(path).catch(() => null);
    if (!module || typeof module.validate !== "function") {
      throw new Error(`schema keyword k8sSchema names ${name}, which kubernetes-models does not define (${path})`);
    }
    validators.set(name, module.validate);
  }
  return validators;
}

function describeError(error) {
  const params = error.params ?? {};
  const detail = error.message
    ?? `${error.keyword} ${JSON.stringify(params)}`;
  const extra = params.additionalProperty ? ` (${params.additionalProperty})` : "";
  return `data${error.instancePath} ${detail}${extra}`;
}

async function jsonSchemaValidator(relativePath) {
  const { default: Ajv } = await importFrom("ajv/dist/ajv.js");
  const schema = JSON.parse(readFileSync(new URL(relativePath, here), "utf8"));
  const k8sValidators = await loadK8sSchemaValidators(schema);
  const ajv = new Ajv({ allErrors: true, strict: true });
  ajv.addKeyword({
    keyword: "k8sSchema",
    schemaType: "string",
    errors: true,
    validate: function k8s(name, data, _parentSchema, context) {
      const validate = k8sValidators.get(name);
      if (validate(data)) return true;
      k8s.errors = validate.errors.map((error) => ({
        ...error,
        instancePath: (context?.instancePath ?? "") + error.instancePath,
      }));
      return false;
    },
  });
  const compiled = ajv.compile(schema);
  return (object) => {
    if (!compiled(object)) {
      throw new Error(compiled.errors.map(describeError).join(", "));
    }
  };
}

const schemaCache = new Map();
async function validatorFor(apiVersion, kind) {
  const key = `${apiVersion}/${kind}`;
  if (!(key in jsonSchemas)) return modelClass(apiVersion, kind);
  if (!schemaCache.has(key)) {
    schemaCache.set(key, {
      validate: await jsonSchemaValidator(jsonSchemas[key]),
      label: `tests/validate/${jsonSchemas[key]}`,
    });
  }
  return schemaCache.get(key);
}

// Unknown fields. The OpenAPI schemas behind the validators above allow
// properties they do not define (a misspelt `hostPid` passes them), as the
// API server's lenient decoding does. kubernetes-models also ships a
// TypeScript interface per kind; assigning each object, as a literal, to its
// interface makes the TypeScript compiler reject every property the
// interface does not have, at any depth. One program for all objects, one
// object per line, so a diagnostic's line names its object.
async function unknownFieldErrors(checked) {
  if (checked.length === 0) return new Map();
  const { default: ts } = await importFrom("typescript/lib/typescript.js");
  const lines = [];
  checked.forEach(({ object, typeModule, typeName }, index) => {
    lines.push(`import type { ${typeName} as T${index} } from "${typeModule}";`);
  });
  const firstObjectLine = lines.length;
  checked.forEach(({ object }, index) => {
    lines.push(`export const o${index}: T${index} = ${JSON.stringify(object)};`);
  });
  // Inside the validators' install directory so that module resolution
  // finds their packages; removed afterwards.
  const file = join(nodeModules, "..", `unknown-fields-${process.pid}.ts`);
  writeFileSync(file, lines.join("\n") + "\n");
  try {
    const program = ts.createProgram([file], {
      noEmit: true,
      strict: true,
      skipLibCheck: true,
      target: ts.ScriptTarget.ES2022,
      module: ts.ModuleKind.NodeNext,
      moduleResolution: ts.ModuleResolutionKind.NodeNext,
    });
    const errors = new Map();
    for (const diagnostic of ts.getPreEmitDiagnostics(program)) {
      const message = ts.flattenDiagnosticMessageText(diagnostic.messageText, " ");
      const line = diagnostic.file && diagnostic.start !== undefined
        ? diagnostic.file.getLineAndCharacterOfPosition(diagnostic.start).line
        : -1;
      const index = line - firstObjectLine;
      if (index < 0 || index >= checked.length) {
        throw new Error(`type check of unknown fields failed outside any object: ${message}`);
      }
      const key = checked[index].reportIndex;
      errors.set(key, [...(errors.get(key) ?? []), `unknown or mistyped field: ${message}`]);
    }
    return errors;
  } finally {
    rmSync(file, { force: true });
  }
}

const input = JSON.parse(readFileSync(0, "utf8"));
if (!Array.isArray(input)) {
  console.error("stdin must be a JSON array of {source, object}");
  process.exit(2);
}
const reports = [];
const typeChecked = [];
for (const { source, object } of input) {
  const apiVersion = object?.apiVersion;
  const kind = object?.kind;
  const name = object?.metadata?.name ?? null;
  const report = { source, apiVersion, kind, name, validator: null, errors: [] };
  if (typeof apiVersion !== "string" || typeof kind !== "string") {
    report.errors.push("object has no apiVersion/kind");
  } else {
    const validator = await validatorFor(apiVersion, kind);
    if (!validator) {
      report.errors.push(`no validator for ${apiVersion} ${kind}: add its @kubernetes-models package or a schema in tests/validate/schemas`);
    } else {
      report.validator = validator.label;
      try {
        validator.validate(object);
      } catch (error) {
        report.errors.push(String(error.message ?? error));
      }
      if (validator.typeModule) {
        typeChecked.push({ object, typeModule: validator.typeModule, typeName: validator.typeName, reportIndex: reports.length });
      }
    }
  }
  reports.push(report);
}
const unknownFields = await unknownFieldErrors(typeChecked);
let failures = 0;
reports.forEach((report, index) => {
  report.errors.push(...(unknownFields.get(index) ?? []));
  if (report.errors.length > 0) failures++;
  process.stdout.write(JSON.stringify(report) + "\n");
});
process.exit(failures > 0 ? 1 : 0);
