//! Evaluation of ARM deployment templates that wrap Azure VM Image Builder templates.
//!
//! Users often keep their image template inside an Azure Resource Manager deployment template
//! (`{"$schema": ".../deploymentTemplate.json#", "parameters": {...}, "variables": {...},
//! "resources": [{"type": "Microsoft.VirtualMachineImages/imageTemplates", ...}]}`) and deploy it
//! with `az deployment group create`. This module does locally what ARM does before it hands the
//! resource to Image Builder: it binds parameters (from an ARM parameters file, `-p name=value`
//! overrides, or `defaultValue`s), evaluates the template language expressions (`"[...]"`
//! strings) that the image template resources need, and returns those resources with every
//! expression replaced by its value.
//!
//! Locations are kept: a value produced by an expression carries the span of the JSON string that
//! held the expression, values that were not expressions keep their own spans, and a diagnostic
//! about an expression points at the offending character inside the string whenever the string
//! has no JSON escapes (otherwise at the whole string).
//!
//! What is evaluated lazily: only the parameters and variables that an image template resource
//! actually uses, so an unrelated resource that calls `reference()` or a function kiln does not
//! know does not stop the build. Expressions that cannot be evaluated are left in place as the
//! original string and listed in [`EvaluatedResource::unresolved`]; every problem found is
//! reported, not just the first.
//!
//! Where image templates are found: top-level `resources` (an array, or an object of symbolic
//! names for `languageVersion` 2.0), nested child `resources` arrays, and inline nested
//! deployments (`Microsoft.Resources/deployments` with `properties.template`) in both `outer` and
//! `inner` expression-evaluation scope. Linked templates (`templateLink`) cannot be fetched and
//! are skipped. Resources with `"existing": true` are references, not deployments, and are
//! skipped, as are resources whose `condition` is false. Resource `copy` loops produce one
//! resource per iteration; property and variable `copy` loops are expanded.
//!
//! Not evaluated (reported, never guessed): functions that read live Azure state
//! (`reference`, `list*`, `pickZones`, `providers`), `managementGroup()`, the `dateTime*`
//! functions, CIDR functions, `tryGet`, `groupBy`, `mapValues`, `shallowMerge`. Copy loops on a
//! nested *deployment* resource are not iterated (its image templates are evaluated once, where
//! `copyIndex()` does not resolve). `uniqueString` is ARM's 64-bit MurmurHash variant in base32
//! and `guid` a version-5 UUID in ARM's namespace, both over the arguments joined with `-`, so
//! names derived from them match what Azure would create.
//!
//! Bounds: expressions nest at most [`MAX_EXPRESSION_NESTING`] deep, evaluation (expressions,
//! variable chains and JSON nesting together) at most 128 levels, values at most 160 levels;
//! strings built by functions are capped at 4 MiB, loops at ARM's own limits (800 copies, 10 000
//! for `range`), and every evaluation runs under a fixed work budget, so hostile templates fail
//! with a diagnostic instead of exhausting the stack or the machine.

use std::rc::Rc;

use serde_json::{Map, Value as JV};

use crate::json::{Key, Node, Span, Value};

/// Diagnostic code: a parameter the image template needs has no value.
pub const MISSING_PARAMETER: &str = "MissingParameter";
/// Diagnostic code: the expression calls a function kiln does not evaluate (for example
/// `reference()`, which needs a live Azure deployment).
pub const UNSUPPORTED_ARM_FUNCTION: &str = "UnsupportedArmFunction";
/// Diagnostic code: the expression is malformed or fails to evaluate (syntax error, wrong
/// argument count or type, unknown parameter or variable, circular reference, a parameter value
/// outside `allowedValues`, ...).
pub const ARM_EXPRESSION_ERROR: &str = "ArmExpressionError";
/// Diagnostic code: the deployment template yields no image template to build (none declared,
/// all skipped by `condition`, or only reachable through a linked template).
pub const NO_IMAGE_TEMPLATE: &str = "NoImageTemplate";

/// The resource type of an Image Builder template (compared ignoring ASCII case).
pub const IMAGE_TEMPLATE_TYPE: &str = "Microsoft.VirtualMachineImages/imageTemplates";
const DEPLOYMENT_TYPE: &str = "Microsoft.Resources/deployments";

/// The deepest nesting of function calls, property accesses and indexes inside one expression.
pub const MAX_EXPRESSION_NESTING: usize = 64;
const MAX_EVAL_DEPTH: usize = 128;
const MAX_VALUE_DEPTH: usize = 160;
const MAX_STRING_BYTES: usize = 4 << 20;
const MAX_COPY: i64 = 800;
const MAX_RANGE: i64 = 10_000;
const MAX_NESTED_DEPLOYMENTS: usize = 16;
/// Work units per evaluation: one per expression node evaluated plus the size of every value
/// built or copied (one unit per JSON node and per 16 bytes of string).
const WORK_BUDGET: u64 = 2_000_000;

/// Where the deployment would happen: the values that `resourceGroup()`, `subscription()`,
/// `deployment()` and the resource-ID functions report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArmContext {
    /// The subscription ID (a GUID; also reported as `subscription().displayName`).
    pub subscription_id: String,
    /// The resource group's name.
    pub resource_group: String,
    /// The resource group's region (also `deployment().location` in subscription-scoped
    /// templates).
    pub resource_group_location: String,
    /// The deployment's name (`deployment().name`).
    pub deployment_name: String,
    /// The Microsoft Entra tenant ID (a GUID).
    pub tenant_id: String,
}

impl Default for ArmContext {
    /// A placeholder context: all-zero subscription and tenant, resource group `kiln-local` in
    /// `eastus`, deployment `kiln`.
    fn default() -> ArmContext {
        ArmContext {
            subscription_id: "00000000-0000-0000-0000-000000000000".into(),
            resource_group: "kiln-local".into(),
            resource_group_location: "eastus".into(),
            deployment_name: "kiln".into(),
            tenant_id: "00000000-0000-0000-0000-000000000000".into(),
        }
    }
}

/// A problem found while reading or evaluating a deployment template or parameters file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArmDiag {
    /// One of [`MISSING_PARAMETER`], [`UNSUPPORTED_ARM_FUNCTION`], [`ARM_EXPRESSION_ERROR`],
    /// [`NO_IMAGE_TEMPLATE`].
    pub code: &'static str,
    /// Where, in the file that was read (the parameters file for [`parse_parameters_file`]).
    pub span: Span,
    /// What is wrong, naming the function, parameter or variable.
    pub message: String,
    /// What to do about it.
    pub fix: String,
}

/// One image template resource after evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluatedResource {
    /// The resource object (`type`, `apiVersion`, `name`, `location`, `identity`,
    /// `properties`, ...) with every expression evaluated. Evaluated values carry the span of
    /// the expression string they came from.
    pub node: Node,
    /// Spans of the strings (values or object keys) that could not be evaluated and were kept as
    /// the original expression text; each has a diagnostic explaining why (possibly at the
    /// parameter or variable the expression depends on).
    pub unresolved: Vec<Span>,
}

/// Whether `root` looks like an ARM deployment template rather than a bare image template: a
/// `$schema` naming a deployment template (any scope), or a top-level `resources` collection
/// together with `parameters`, `variables` or `contentVersion`.
pub fn is_deployment_template(root: &Node) -> bool {
    if let Some((_, s)) = root.get_ci("$schema") {
        if let Some(s) = s.as_str() {
            if s.to_ascii_lowercase().contains("deploymenttemplate") {
                return true;
            }
        }
    }
    let has_resources = matches!(
        root.get_ci("resources").map(|(_, n)| &n.value),
        Some(Value::Array(_) | Value::Object(_))
    );
    has_resources
        && (root.get_ci("parameters").is_some()
            || root.get_ci("variables").is_some()
            || root.get_ci("contentVersion").is_some())
}

/// Reads an ARM deployment parameters file: `{"parameters": {"name": {"value": ...}}}` (the
/// bare `{"name": {"value": ...}}` form that the Azure CLI also accepts works too). Values are
/// taken literally, as ARM does (expressions in a parameters file are not evaluated).
///
/// A Key Vault `reference` entry is an error: kiln cannot read secrets from Azure.
pub fn parse_parameters_file(root: &Node) -> Result<Vec<(String, JV)>, ArmDiag> {
    let err = |span: Span, message: String, fix: &str| ArmDiag {
        code: ARM_EXPRESSION_ERROR,
        span,
        message,
        fix: fix.to_string(),
    };
    if root.as_object().is_none() {
        return Err(err(
            root.span,
            format!(
                "an ARM parameters file is a JSON object, found {}",
                root.value.kind()
            ),
            "write {\"parameters\": {\"NAME\": {\"value\": VALUE}}}",
        ));
    }
    if is_deployment_template(root) && root.get_ci("resources").is_some() {
        return Err(err(
            root.span,
            "this is a deployment template, not a parameters file".into(),
            "pass the template as the build input and the parameters file with --parameters",
        ));
    }
    let params = match root.get_ci("parameters") {
        Some((_, p)) => p,
        None => root,
    };
    let Some(members) = params.as_object() else {
        return Err(err(
            params.span,
            format!(
                "`parameters` must be an object, found {}",
                params.value.kind()
            ),
            "write \"parameters\": {\"NAME\": {\"value\": VALUE}}",
        ));
    };
    let mut out: Vec<(String, JV)> = Vec::new();
    for (k, v) in members {
        if std::ptr::eq(params, root)
            && (k.name.starts_with('$') || k.name.eq_ignore_ascii_case("contentVersion"))
        {
            continue;
        }
        if let Some((_, r)) = v.get_ci("reference") {
            let secret = r
                .get_ci("secretName")
                .and_then(|(_, s)| s.as_str())
                .unwrap_or("?");
            return Err(err(
                v.span,
                format!(
                    "parameter '{}' is a Key Vault reference (secret '{secret}'): kiln cannot read secrets from Azure Key Vault",
                    k.name
                ),
                &format!("pass the value directly with -p {}=VALUE, or replace the reference with {{\"value\": ...}}", k.name),
            ));
        }
        let Some((_, value)) = v.get_ci("value") else {
            return Err(err(
                v.span,
                format!("parameter '{}' has no \"value\" member", k.name),
                &format!("write \"{}\": {{\"value\": ...}}", k.name),
            ));
        };
        out.retain(|(n, _)| !n.eq_ignore_ascii_case(&k.name));
        out.push((k.name.clone(), value.to_json()));
    }
    Ok(out)
}

/// Finds the image template resources of the deployment template `root`, binds `params`
/// (from [`parse_parameters_file`] and `-p` overrides; a string given for a parameter declared
/// `int`, `bool`, `array` or `object` is parsed as JSON) and evaluates every expression in those
/// resources, in the deployment context `ctx`.
///
/// Returns the evaluated resources (one per `copy` iteration) and every problem found.
pub fn evaluate_image_templates(
    root: &Node,
    params: &[(String, JV)],
    ctx: &ArmContext,
) -> (Vec<EvaluatedResource>, Vec<ArmDiag>) {
    let mut ev = Eval::new();
    let mut out = Vec::new();
    if root.as_object().is_none() {
        ev.diag(
            ARM_EXPRESSION_ERROR,
            root.span,
            format!(
                "a deployment template is a JSON object, found {}",
                root.value.kind()
            ),
            "pass an ARM deployment template or a bare image template",
        );
        return (out, ev.diags);
    }
    let schema = root
        .get_ci("$schema")
        .and_then(|(_, s)| s.as_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let rg_scope = !(schema.contains("subscriptiondeploymenttemplate")
        || schema.contains("managementgroupdeploymenttemplate")
        || schema.contains("tenantdeploymenttemplate"));
    let top = Ctx {
        sub: ctx.subscription_id.clone(),
        rg: ctx.resource_group.clone(),
        loc: ctx.resource_group_location.clone(),
        deployment: ctx.deployment_name.clone(),
        tenant: ctx.tenant_id.clone(),
        rg_scope,
        content_version: content_version(root),
    };
    let scope = ev.build_scope(root, top, ParamInput::Given(params));
    // Values given on the command line or in a parameters file are checked even when no image
    // template uses them (as ARM does); defaults are only evaluated when needed.
    for i in 0..ev.scopes[scope].params.len() {
        if matches!(ev.scopes[scope].params[i].source, PSource::Given(_)) {
            let span = ev.scopes[scope].params[i].key_span;
            let _ = ev.param_value(scope, i, span);
        }
    }
    if let Some((_, resources)) = root.get_ci("resources") {
        ev.walk(resources, scope, &mut out, 0);
    }
    if out.is_empty() {
        let (span, message, fix) = if ev.skipped > 0 {
            (
                root.span,
                "every image template resource is switched off by its `condition` (or a copy count of 0)".to_string(),
                "check the parameters that the resource's `condition` depends on",
            )
        } else if ev.linked > 0 {
            (
                root.span,
                "no image template resource is inline in this deployment template; linked templates (templateLink) cannot be fetched".to_string(),
                "pass the linked template file itself to kiln",
            )
        } else {
            (
                root.span,
                format!("the deployment template declares no {IMAGE_TEMPLATE_TYPE} resource"),
                "pass a template that contains an image template resource",
            )
        };
        ev.diag(NO_IMAGE_TEMPLATE, span, message, fix);
    }
    let mut diags: Vec<ArmDiag> = Vec::new();
    for d in ev.diags {
        if !diags.contains(&d) {
            diags.push(d);
        }
    }
    (out, diags)
}

fn content_version(tpl: &Node) -> String {
    tpl.get_ci("contentVersion")
        .and_then(|(_, s)| s.as_str())
        .unwrap_or("1.0.0.0")
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// Expression syntax
// ---------------------------------------------------------------------------------------------

/// How a JSON string is read by ARM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lit {
    /// A literal string.
    Plain,
    /// `[[...]`: a literal whose first `[` is dropped.
    Escaped,
    /// `[...]`: an expression.
    Expr,
}

fn classify(s: &str) -> Lit {
    if s.len() >= 2 && s.starts_with('[') && s.ends_with(']') {
        if s.starts_with("[[") {
            Lit::Escaped
        } else {
            Lit::Expr
        }
    } else {
        Lit::Plain
    }
}

/// Maps byte offsets inside a string value to spans in the source file.
#[derive(Debug, Clone, Copy)]
struct Src {
    span: Span,
    exact: bool,
}

impl Src {
    fn new(span: Span, text: &str) -> Src {
        // Escapes always make the source text longer than the value; equal lengths (plus the two
        // quotes) mean every byte of the value stands at its own offset in the file.
        Src {
            span,
            exact: span.end >= span.start && span.end - span.start == text.len() + 2,
        }
    }

    fn at(&self, r: (usize, usize)) -> Span {
        if self.exact {
            Span::new(
                self.span.start + 1 + r.0,
                self.span.start + 1 + r.1.max(r.0),
            )
        } else {
            self.span
        }
    }
}

#[derive(Debug, Clone)]
struct Ex {
    kind: ExKind,
    /// Byte range inside the string value (which includes the enclosing brackets).
    at: (usize, usize),
}

#[derive(Debug, Clone)]
enum ExKind {
    Str(String),
    Int(i64),
    Bool(bool),
    Null,
    Call {
        name: String,
        name_at: (usize, usize),
        args: Vec<Ex>,
    },
    Prop {
        target: Box<Ex>,
        name: String,
    },
    Index {
        target: Box<Ex>,
        index: Box<Ex>,
    },
}

#[derive(Debug)]
struct SyntaxError {
    at: (usize, usize),
    msg: String,
}

/// Parses the expression string `text` (`[` ... `]`, brackets included).
fn parse_expression(text: &str) -> Result<Ex, SyntaxError> {
    let end = text.len() - 1;
    let mut p = Parser {
        s: text,
        b: text.as_bytes(),
        pos: 1,
        end,
        depth: 0,
    };
    p.ws();
    if p.pos >= end {
        return Err(SyntaxError {
            at: (0, text.len()),
            msg: "empty expression `[]`".into(),
        });
    }
    let e = p.expr()?;
    p.ws();
    if p.pos < end {
        return Err(p.unexpected("after the end of the expression"));
    }
    Ok(e)
}

struct Parser<'s> {
    s: &'s str,
    b: &'s [u8],
    pos: usize,
    end: usize,
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        if self.pos < self.end {
            Some(self.b[self.pos])
        } else {
            None
        }
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn err(&self, at: (usize, usize), msg: impl Into<String>) -> SyntaxError {
        SyntaxError {
            at,
            msg: msg.into(),
        }
    }

    fn unexpected(&self, context: &str) -> SyntaxError {
        match self.s[self.pos..self.end].chars().next() {
            Some(c) => self.err(
                (self.pos, self.pos + c.len_utf8()),
                format!("unexpected `{c}` {context}"),
            ),
            None => self.err(
                (self.end, self.end + 1),
                format!("the expression ends too early ({context})"),
            ),
        }
    }

    fn enter(&mut self, at: usize) -> Result<(), SyntaxError> {
        self.depth += 1;
        if self.depth > MAX_EXPRESSION_NESTING {
            return Err(self.err(
                (at, at + 1),
                format!("expression nested deeper than {MAX_EXPRESSION_NESTING} levels"),
            ));
        }
        Ok(())
    }

    fn expr(&mut self) -> Result<Ex, SyntaxError> {
        self.ws();
        let start = self.pos;
        self.enter(start)?;
        let mut e = self.primary()?;
        let base_depth = self.depth;
        loop {
            self.ws();
            match self.peek() {
                Some(b'.') => {
                    self.enter(self.pos)?;
                    self.pos += 1;
                    self.ws();
                    let ns = self.pos;
                    while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c == b'-' || c == b'@')
                    {
                        self.pos += 1;
                    }
                    if self.pos == ns {
                        return Err(self.unexpected("after `.` (a property name is expected)"));
                    }
                    let name = self.s[ns..self.pos].to_string();
                    e = Ex {
                        kind: ExKind::Prop {
                            target: Box::new(e),
                            name,
                        },
                        at: (start, self.pos),
                    };
                }
                Some(b'[') => {
                    self.enter(self.pos)?;
                    let open = self.pos;
                    self.pos += 1;
                    let index = self.expr()?;
                    self.ws();
                    if self.peek() != Some(b']') {
                        if self.peek().is_none() {
                            return Err(self.err((open, open + 1), "unclosed `[`: `]` expected"));
                        }
                        return Err(self.unexpected("in an index (`]` expected)"));
                    }
                    self.pos += 1;
                    e = Ex {
                        kind: ExKind::Index {
                            target: Box::new(e),
                            index: Box::new(index),
                        },
                        at: (start, self.pos),
                    };
                }
                _ => break,
            }
        }
        self.depth = base_depth - 1;
        Ok(e)
    }

    fn primary(&mut self) -> Result<Ex, SyntaxError> {
        let start = self.pos;
        match self.peek() {
            None => Err(self.unexpected("(a value is expected)")),
            Some(b'\'') => self.string(),
            Some(b'0'..=b'9' | b'-') => self.integer(),
            Some(c) if c.is_ascii_alphabetic() || c == b'_' => {
                while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || c == b'_' || c == b'.')
                {
                    self.pos += 1;
                }
                let name = &self.s[start..self.pos];
                let name_at = (start, self.pos);
                self.ws();
                if self.peek() == Some(b'(') {
                    if name.ends_with('.') || name.contains("..") {
                        return Err(self.err(name_at, format!("invalid function name `{name}`")));
                    }
                    let open = self.pos;
                    self.pos += 1;
                    let mut args = Vec::new();
                    self.ws();
                    if self.peek() == Some(b')') {
                        self.pos += 1;
                    } else {
                        loop {
                            args.push(self.expr()?);
                            self.ws();
                            match self.peek() {
                                Some(b',') => self.pos += 1,
                                Some(b')') => {
                                    self.pos += 1;
                                    break;
                                }
                                None => {
                                    return Err(self.err(
                                        (open, open + 1),
                                        format!("unclosed `(` of `{name}(`: `)` expected"),
                                    ))
                                }
                                Some(_) => {
                                    return Err(self
                                        .unexpected("in an argument list (`,` or `)` expected)"))
                                }
                            }
                        }
                    }
                    Ok(Ex {
                        kind: ExKind::Call {
                            name: name.to_string(),
                            name_at,
                            args,
                        },
                        at: (start, self.pos),
                    })
                } else {
                    let kind = match name.to_ascii_lowercase().as_str() {
                        "true" => ExKind::Bool(true),
                        "false" => ExKind::Bool(false),
                        "null" => ExKind::Null,
                        _ => {
                            return Err(self.err(
                                name_at,
                                format!("`{name}` is not a function call or a value (`{name}(...)` or a quoted string `'{name}'`?)"),
                            ))
                        }
                    };
                    Ok(Ex { kind, at: name_at })
                }
            }
            Some(_) => {
                Err(self.unexpected("(a function call, a 'string' or a number is expected)"))
            }
        }
    }

    fn string(&mut self) -> Result<Ex, SyntaxError> {
        let start = self.pos;
        self.pos += 1;
        let mut out = String::new();
        loop {
            let rest = &self.b[self.pos..self.end];
            match rest.iter().position(|&c| c == b'\'') {
                None => {
                    return Err(self.err(
                        (start, start + 1),
                        "unterminated string literal: closing `'` expected",
                    ));
                }
                Some(i) => {
                    out.push_str(&self.s[self.pos..self.pos + i]);
                    self.pos += i + 1;
                    if self.peek() == Some(b'\'') {
                        out.push('\'');
                        self.pos += 1;
                    } else {
                        break;
                    }
                }
            }
        }
        Ok(Ex {
            kind: ExKind::Str(out),
            at: (start, self.pos),
        })
    }

    fn integer(&mut self) -> Result<Ex, SyntaxError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        let digits = self.pos;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        if self.pos == digits {
            return Err(self.err((start, start + 1), "`-` must be followed by digits"));
        }
        if self.peek() == Some(b'.') && matches!(self.b.get(self.pos + 1), Some(b'0'..=b'9')) {
            return Err(self.err(
                (start, self.pos + 1),
                "decimal numbers are not part of the ARM expression language (use json('1.5'))",
            ));
        }
        let text = &self.s[start..self.pos];
        match text.parse::<i64>() {
            Ok(n) => Ok(Ex {
                kind: ExKind::Int(n),
                at: (start, self.pos),
            }),
            Err(_) => Err(self.err(
                (start, self.pos),
                format!("integer `{text}` is out of range"),
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation state
// ---------------------------------------------------------------------------------------------

/// An evaluation failed; the reason is already in `Eval::diags` (or at the parameter or
/// variable it depends on).
#[derive(Debug)]
struct Failed;

type R<T> = Result<T, Failed>;

/// The deployment context of one template scope.
#[derive(Debug, Clone)]
struct Ctx {
    sub: String,
    rg: String,
    loc: String,
    deployment: String,
    tenant: String,
    /// Resource-group scope (else subscription, management-group or tenant scope).
    rg_scope: bool,
    content_version: String,
}

enum ParamInput<'a, 't> {
    /// The top-level template: values from the parameters file and `-p`.
    Given(&'a [(String, JV)]),
    /// An inner-scope nested template: values from the deployment resource's
    /// `properties.parameters`, evaluated in the scope `outer`.
    Nested {
        outer: usize,
        params: Option<&'t Node>,
    },
}

enum PSource<'t> {
    Default,
    Given(JV),
    Outer { scope: usize, node: &'t Node },
    KeyVault(Span),
}

enum Memo {
    Todo,
    Busy,
    Done(Rc<JV>),
    Failed,
}

struct Param<'t> {
    name: String,
    key_span: Span,
    decl: &'t Node,
    source: PSource<'t>,
    memo: Memo,
}

enum VarDef<'t> {
    Node(&'t Node),
    /// A `copy` entry of the variables section: `{"name", "count", "input"}`.
    Copy(&'t Node),
}

struct Var<'t> {
    name: String,
    def: VarDef<'t>,
    memo: Memo,
}

struct UserFn<'t> {
    /// `namespace.member`, lower case.
    name: String,
    node: &'t Node,
}

struct Scope<'t> {
    params: Vec<Param<'t>>,
    vars: Vec<Var<'t>>,
    funcs: Vec<UserFn<'t>>,
    ctx: Ctx,
    nested: bool,
}

/// What an expression can see besides its scope: loop indexes, lambda variables, the
/// arguments of the user-defined function being evaluated.
#[derive(Debug, Clone, Default)]
struct Frame {
    scope: usize,
    res_loop: Option<(String, i64)>,
    loops: Vec<(String, i64)>,
    lambdas: Vec<(String, JV)>,
    fn_args: Option<Rc<Vec<(String, JV)>>>,
    in_param_default: bool,
}

impl Frame {
    fn new(scope: usize) -> Frame {
        Frame {
            scope,
            ..Frame::default()
        }
    }

    fn with_loop(&self, name: &str, i: i64) -> Frame {
        let mut f = self.clone();
        f.loops.push((name.to_string(), i));
        f
    }
}

/// A function call being evaluated.
struct Site<'a> {
    name: &'a str,
    name_span: Span,
    span: Span,
    args: &'a [Ex],
    src: Src,
}

impl Site<'_> {
    fn arg(&self, i: usize) -> Span {
        self.args.get(i).map_or(self.span, |a| self.src.at(a.at))
    }
}

struct Eval<'t> {
    scopes: Vec<Scope<'t>>,
    diags: Vec<ArmDiag>,
    work: u64,
    exhausted: bool,
    depth: usize,
    /// Image templates skipped by `condition` or a copy count of 0.
    skipped: usize,
    /// Nested deployments that only link their template.
    linked: usize,
}

fn find_ci<T>(items: &[T], name: &str, key: impl Fn(&T) -> &str) -> Option<usize> {
    items
        .iter()
        .position(|t| key(t) == name)
        .or_else(|| items.iter().position(|t| key(t).eq_ignore_ascii_case(name)))
}

fn names<T>(items: &[T], key: impl Fn(&T) -> &str) -> String {
    if items.is_empty() {
        return "none".into();
    }
    let mut v: Vec<&str> = items.iter().map(key).collect();
    if v.len() > 12 {
        v.truncate(12);
        v.push("...");
    }
    v.join(", ")
}

fn kind(v: &JV) -> &'static str {
    match v {
        JV::Null => "null",
        JV::Bool(_) => "boolean",
        JV::Number(n) if n.is_i64() || n.is_u64() => "integer",
        JV::Number(_) => "number",
        JV::String(_) => "string",
        JV::Array(_) => "array",
        JV::Object(_) => "object",
    }
}

/// (size in work units, nesting depth), stopping early once the size passes `cap`.
fn measure(v: &JV, cap: u64) -> (u64, usize) {
    let mut size = 0u64;
    let mut deepest = 0usize;
    let mut stack = vec![(v, 1usize)];
    while let Some((x, d)) = stack.pop() {
        size += 1;
        deepest = deepest.max(d);
        match x {
            JV::String(s) => size += s.len() as u64 / 16,
            JV::Array(a) => stack.extend(a.iter().map(|e| (e, d + 1))),
            JV::Object(m) => {
                for (k, e) in m {
                    size += k.len() as u64 / 16;
                    stack.push((e, d + 1));
                }
            }
            _ => {}
        }
        if size > cap || deepest > MAX_VALUE_DEPTH {
            break;
        }
    }
    (size, deepest)
}

impl<'t> Eval<'t> {
    fn new() -> Eval<'t> {
        Eval {
            scopes: Vec::new(),
            diags: Vec::new(),
            work: 0,
            exhausted: false,
            depth: 0,
            skipped: 0,
            linked: 0,
        }
    }

    fn diag(
        &mut self,
        code: &'static str,
        span: Span,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.diags.push(ArmDiag {
            code,
            span,
            message: message.into(),
            fix: fix.into(),
        });
    }

    fn fail(&mut self, span: Span, message: impl Into<String>, fix: impl Into<String>) -> Failed {
        self.diag(ARM_EXPRESSION_ERROR, span, message, fix);
        Failed
    }

    fn tick(&mut self, n: u64, span: Span) -> R<()> {
        if self.exhausted {
            return Err(Failed);
        }
        self.work += n;
        if self.work > WORK_BUDGET {
            self.exhausted = true;
            self.diag(
                ARM_EXPRESSION_ERROR,
                span,
                "evaluation stopped: this template needs more work than kiln allows (values or loops grow too large)",
                "simplify the expressions: real templates stay far below this limit",
            );
            return Err(Failed);
        }
        Ok(())
    }

    /// Charges the cost of building or copying `v` and bounds its nesting.
    fn charge(&mut self, v: &JV, span: Span) -> R<()> {
        let cap = WORK_BUDGET.saturating_sub(self.work) + 1;
        let (size, depth) = measure(v, cap);
        if depth > MAX_VALUE_DEPTH {
            return Err(self.fail(
                span,
                format!("the value built here is nested deeper than {MAX_VALUE_DEPTH} levels"),
                "flatten the value",
            ));
        }
        self.tick(size, span)
    }

    fn enter(&mut self, span: Span) -> R<()> {
        self.depth += 1;
        if self.depth > MAX_EVAL_DEPTH {
            self.depth -= 1;
            return Err(self.fail(
                span,
                format!("evaluation nested deeper than {MAX_EVAL_DEPTH} levels (deeply nested values, or a long chain of variables that use each other)"),
                "flatten the template: real templates stay far below this limit",
            ));
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }

    // -- scopes ----------------------------------------------------------------------------------

    fn build_scope(&mut self, tpl: &'t Node, ctx: Ctx, input: ParamInput<'_, 't>) -> usize {
        let mut params: Vec<Param<'t>> = Vec::new();
        let decls = tpl.get_ci("parameters");
        if let Some((k, d)) = decls {
            match d.as_object() {
                Some(m) => {
                    for (pk, pd) in m {
                        params.push(Param {
                            name: pk.name.clone(),
                            key_span: pk.span,
                            decl: pd,
                            source: PSource::Default,
                            memo: Memo::Todo,
                        });
                    }
                }
                None => self.diag(
                    ARM_EXPRESSION_ERROR,
                    k.span,
                    "`parameters` must be an object",
                    "declare parameters as \"parameters\": {\"name\": {\"type\": \"string\"}}",
                ),
            }
        }
        let nested = matches!(input, ParamInput::Nested { .. });
        match input {
            ParamInput::Given(list) => {
                let at = decls.map_or(Span::new(tpl.span.start, tpl.span.start + 1), |(k, _)| {
                    k.span
                });
                for (name, v) in list {
                    match find_ci(&params, name, |p| &p.name) {
                        Some(i) => params[i].source = PSource::Given(v.clone()),
                        None => {
                            let declared = names(&params, |p| &p.name);
                            self.diag(
                                ARM_EXPRESSION_ERROR,
                                at,
                                format!("a value was given for parameter '{name}', but the template declares no such parameter (declared: {declared})"),
                                "fix the parameter name, or remove it from the parameters file / -p options",
                            );
                        }
                    }
                }
            }
            ParamInput::Nested {
                outer,
                params: given,
            } => {
                if let Some(m) = given.and_then(Node::as_object) {
                    for (k, v) in m {
                        match find_ci(&params, &k.name, |p| &p.name) {
                            Some(i) => {
                                params[i].source = if v.get_ci("reference").is_some() {
                                    PSource::KeyVault(v.span)
                                } else if let Some((_, val)) = v.get_ci("value") {
                                    PSource::Outer {
                                        scope: outer,
                                        node: val,
                                    }
                                } else {
                                    self.diag(
                                        ARM_EXPRESSION_ERROR,
                                        v.span,
                                        format!(
                                            "nested deployment parameter '{}' has no \"value\"",
                                            k.name
                                        ),
                                        format!("write \"{}\": {{\"value\": ...}}", k.name),
                                    );
                                    PSource::Default
                                };
                            }
                            None => self.diag(
                                ARM_EXPRESSION_ERROR,
                                k.span,
                                format!("the nested template declares no parameter '{}'", k.name),
                                "fix the name or declare the parameter in the nested template",
                            ),
                        }
                    }
                }
            }
        }
        let mut vars: Vec<Var<'t>> = Vec::new();
        if let Some((_, m)) = tpl.get_ci("variables") {
            for (k, v) in m.as_object().unwrap_or(&[]) {
                if k.name.eq_ignore_ascii_case("copy") {
                    if let Some(specs) = v.as_array() {
                        for spec in specs {
                            match spec.get_ci("name").and_then(|(_, n)| n.as_str()) {
                                Some(n) => vars.push(Var {
                                    name: n.to_string(),
                                    def: VarDef::Copy(spec),
                                    memo: Memo::Todo,
                                }),
                                None => self.diag(
                                    ARM_EXPRESSION_ERROR,
                                    spec.span,
                                    "a variable `copy` entry needs a literal \"name\"",
                                    "write {\"name\": \"x\", \"count\": N, \"input\": ...}",
                                ),
                            }
                        }
                        continue;
                    }
                }
                vars.push(Var {
                    name: k.name.clone(),
                    def: VarDef::Node(v),
                    memo: Memo::Todo,
                });
            }
        }
        let mut funcs = Vec::new();
        if let Some((_, fs)) = tpl.get_ci("functions") {
            for ns in fs.as_array().unwrap_or(&[]) {
                let Some(nsname) = ns.get_ci("namespace").and_then(|(_, n)| n.as_str()) else {
                    continue;
                };
                if let Some((_, members)) = ns.get_ci("members") {
                    for (k, def) in members.as_object().unwrap_or(&[]) {
                        funcs.push(UserFn {
                            name: format!("{nsname}.{}", k.name).to_ascii_lowercase(),
                            node: def,
                        });
                    }
                }
            }
        }
        self.scopes.push(Scope {
            params,
            vars,
            funcs,
            ctx,
            nested,
        });
        self.scopes.len() - 1
    }

    fn param_value(&mut self, scope: usize, idx: usize, use_span: Span) -> R<JV> {
        match &self.scopes[scope].params[idx].memo {
            Memo::Done(v) => {
                let v = Rc::clone(v);
                self.charge(&v, use_span)?;
                return Ok((*v).clone());
            }
            Memo::Failed => return Err(Failed),
            Memo::Busy => return Err(self.cycle(scope, idx, true, use_span)),
            Memo::Todo => {}
        }
        self.scopes[scope].params[idx].memo = Memo::Busy;
        let r = match self.enter(use_span) {
            Err(e) => Err(e),
            Ok(()) => {
                let r = self.resolve_param(scope, idx);
                self.leave();
                r
            }
        };
        self.scopes[scope].params[idx].memo = match &r {
            Ok(v) => Memo::Done(Rc::new(v.clone())),
            Err(_) => Memo::Failed,
        };
        r
    }

    fn resolve_param(&mut self, scope: usize, idx: usize) -> R<JV> {
        let p = &self.scopes[scope].params[idx];
        let (name, key_span, decl) = (p.name.clone(), p.key_span, p.decl);
        let declared = decl
            .get_ci("type")
            .and_then(|(_, t)| t.as_str())
            .map(str::to_ascii_lowercase);
        let declared = declared.as_deref();
        let (value, vspan) = match &p.source {
            PSource::Given(v) => {
                let v = v.clone();
                (self.coerce_given(&name, declared, v, key_span)?, key_span)
            }
            PSource::Outer { scope: outer, node } => {
                let node: &'t Node = node;
                (self.eval_json(node, &Frame::new(*outer))?, node.span)
            }
            PSource::KeyVault(span) => {
                let span = *span;
                return Err(self.param_unavailable(scope, &name, span, true));
            }
            PSource::Default => match decl.get_ci("defaultValue") {
                Some((_, dv)) => {
                    let f = Frame {
                        in_param_default: true,
                        ..Frame::new(scope)
                    };
                    (self.eval_json(dv, &f)?, dv.span)
                }
                None => return Err(self.param_unavailable(scope, &name, key_span, false)),
            },
        };
        self.check_param(&name, decl, declared, &value, vspan);
        Ok(value)
    }

    #[cold]
    #[inline(never)]
    fn param_unavailable(
        &mut self,
        scope: usize,
        name: &str,
        span: Span,
        key_vault: bool,
    ) -> Failed {
        if key_vault {
            return self.fail(
                span,
                format!("parameter '{name}' is passed as a Key Vault reference: kiln cannot read secrets from Azure Key Vault"),
                "pass the value as {\"value\": ...} instead",
            );
        }
        if self.scopes[scope].nested {
            self.diag(
                MISSING_PARAMETER,
                span,
                format!("parameter '{name}' of the nested template has no value: the deployment resource passes none and it has no defaultValue"),
                format!("add \"{name}\": {{\"value\": ...}} to the deployment's properties.parameters"),
            );
        } else {
            self.diag(
                MISSING_PARAMETER,
                span,
                format!("parameter '{name}' has no value: pass --parameters FILE or -p {name}=VALUE"),
                format!("pass -p {name}=VALUE, list it in an ARM parameters file (--parameters FILE), or give it a defaultValue"),
            );
        }
        Failed
    }

    /// Values from the command line arrive as strings: parse them for non-string parameters.
    fn coerce_given(&mut self, name: &str, declared: Option<&str>, v: JV, span: Span) -> R<JV> {
        let JV::String(s) = &v else { return Ok(v) };
        let parsed = match declared {
            Some("int") => s.trim().parse::<i64>().ok().map(JV::from),
            Some("bool") => match s.trim().to_ascii_lowercase().as_str() {
                "true" => Some(JV::Bool(true)),
                "false" => Some(JV::Bool(false)),
                _ => None,
            },
            Some("array") => serde_json::from_str::<JV>(s).ok().filter(JV::is_array),
            Some("object" | "secureobject") => {
                serde_json::from_str::<JV>(s).ok().filter(JV::is_object)
            }
            _ => return Ok(v),
        };
        match parsed {
            Some(p) => Ok(p),
            None => {
                let t = declared.unwrap_or("?");
                let example = match t {
                    "int" => "42",
                    "bool" => "true",
                    "array" => "'[\"a\",\"b\"]'",
                    _ => "'{\"key\":\"value\"}'",
                };
                Err(self.fail(
                    span,
                    format!(
                        "the value '{}' given for parameter '{name}' is not a valid {t}",
                        truncate(s, 60)
                    ),
                    format!("pass a {t}, for example -p {name}={example}"),
                ))
            }
        }
    }

    /// Loose type check and `allowedValues` / `minValue` / `maxValue` / `minLength` /
    /// `maxLength` (diagnostics only: the value is still used).
    fn check_param(&mut self, name: &str, decl: &Node, declared: Option<&str>, v: &JV, span: Span) {
        let ok = match (declared, v) {
            (_, JV::Null) | (None, _) => true,
            (Some("string" | "securestring"), JV::String(_)) => true,
            (Some("int"), JV::Number(n)) => n.is_i64() || n.is_u64(),
            (Some("bool"), JV::Bool(_)) => true,
            (Some("array"), JV::Array(_)) => true,
            (Some("object" | "secureobject"), JV::Object(_)) => true,
            (
                Some(
                    "string" | "securestring" | "int" | "bool" | "array" | "object"
                    | "secureobject",
                ),
                _,
            ) => false,
            _ => true,
        };
        if !ok {
            let t = declared.unwrap_or("?");
            self.diag(
                ARM_EXPRESSION_ERROR,
                span,
                format!(
                    "parameter '{name}' is declared as {t} but its value is {} {}",
                    article(kind(v)),
                    kind(v)
                ),
                format!("give parameter '{name}' a {t} value"),
            );
            return;
        }
        if let Some((_, allowed)) = decl.get_ci("allowedValues") {
            if let Some(list) = allowed.as_array() {
                let list: Vec<JV> = list.iter().map(Node::to_json).collect();
                let fits = |x: &JV| list.iter().any(|a| jv_eq(a, x));
                let good = match v {
                    JV::Array(items) if declared == Some("array") => items.iter().all(fits),
                    _ => fits(v),
                };
                if !good {
                    let shown: Vec<String> = list
                        .iter()
                        .map(|a| serde_json::to_string(a).unwrap_or_default())
                        .collect();
                    self.diag(
                        ARM_EXPRESSION_ERROR,
                        span,
                        format!(
                            "the value {} of parameter '{name}' is not one of its allowedValues: {}",
                            truncate(&serde_json::to_string(v).unwrap_or_default(), 80),
                            shown.join(", ")
                        ),
                        format!("pass one of the allowed values for '{name}'"),
                    );
                }
            }
        }
        let bound = |key: &str| decl.get_ci(key).and_then(|(_, n)| n.to_json().as_i64());
        let len = match v {
            JV::String(s) => Some(s.chars().count() as i64),
            JV::Array(a) => Some(a.len() as i64),
            _ => None,
        };
        let mut problems = Vec::new();
        if let (Some(n), Some(min)) = (v.as_i64(), bound("minValue")) {
            if n < min {
                problems.push(format!("is {n}, below its minValue {min}"));
            }
        }
        if let (Some(n), Some(max)) = (v.as_i64(), bound("maxValue")) {
            if n > max {
                problems.push(format!("is {n}, above its maxValue {max}"));
            }
        }
        if let (Some(l), Some(min)) = (len, bound("minLength")) {
            if l < min {
                problems.push(format!("has length {l}, below its minLength {min}"));
            }
        }
        if let (Some(l), Some(max)) = (len, bound("maxLength")) {
            if l > max {
                problems.push(format!("has length {l}, above its maxLength {max}"));
            }
        }
        for p in problems {
            self.diag(
                ARM_EXPRESSION_ERROR,
                span,
                format!("the value of parameter '{name}' {p}"),
                format!("pass a value for '{name}' within its declared limits"),
            );
        }
    }

    fn var_value(&mut self, scope: usize, idx: usize, use_span: Span) -> R<JV> {
        match &self.scopes[scope].vars[idx].memo {
            Memo::Done(v) => {
                let v = Rc::clone(v);
                self.charge(&v, use_span)?;
                return Ok((*v).clone());
            }
            Memo::Failed => return Err(Failed),
            Memo::Busy => return Err(self.cycle(scope, idx, false, use_span)),
            Memo::Todo => {}
        }
        self.scopes[scope].vars[idx].memo = Memo::Busy;
        let def = match &self.scopes[scope].vars[idx].def {
            VarDef::Node(n) => VarDef::Node(n),
            VarDef::Copy(n) => VarDef::Copy(n),
        };
        let r = match self.enter(use_span) {
            Err(e) => Err(e),
            Ok(()) => {
                let f = Frame::new(scope);
                let r = match def {
                    VarDef::Node(n) => self.eval_json(n, &f),
                    VarDef::Copy(spec) => self.copy_json(spec, &f).map(|(_, v)| v),
                };
                self.leave();
                r
            }
        };
        self.scopes[scope].vars[idx].memo = match &r {
            Ok(v) => Memo::Done(Rc::new(v.clone())),
            Err(_) => Memo::Failed,
        };
        r
    }

    #[cold]
    #[inline(never)]
    fn cycle(&mut self, scope: usize, idx: usize, param: bool, span: Span) -> Failed {
        if param {
            let name = self.scopes[scope].params[idx].name.clone();
            self.fail(
                span,
                format!("parameter '{name}' depends on itself (circular defaultValue)"),
                "break the cycle: give one of the parameters a literal defaultValue",
            )
        } else {
            let name = self.scopes[scope].vars[idx].name.clone();
            self.fail(
                span,
                format!(
                    "variable '{name}' depends on itself (circular reference through variables())"
                ),
                "break the cycle between the variables",
            )
        }
    }

    // -- JSON trees --------------------------------------------------------------------------------

    /// Evaluates a template string: a literal, an escaped literal, or an expression.
    fn eval_string(&mut self, s: &str, span: Span, f: &Frame) -> R<JV> {
        match classify(s) {
            Lit::Plain => Ok(JV::String(s.to_string())),
            Lit::Escaped => Ok(JV::String(s[1..].to_string())),
            Lit::Expr => {
                let src = Src::new(span, s);
                let ex = match parse_expression(s) {
                    Ok(ex) => ex,
                    Err(e) => {
                        return Err(self.fail(
                            src.at(e.at),
                            format!("invalid template expression: {}", e.msg),
                            "fix the expression syntax: function calls look like name(arg, 'string', 1), properties like .name, indexes like [0]",
                        ))
                    }
                };
                self.eval(&ex, f, src)
            }
        }
    }

    fn eval_key(&mut self, k: &Key, f: &Frame) -> R<String> {
        match self.eval_string(&k.name, k.span, f)? {
            JV::String(s) => Ok(s),
            other => Err(self.fail(
                k.span,
                format!(
                    "a property name must evaluate to a string, this one is {} {}",
                    article(kind(&other)),
                    kind(&other)
                ),
                "use string() around the expression",
            )),
        }
    }

    /// Evaluates a JSON value completely (any failure fails the whole value).
    fn eval_json(&mut self, node: &Node, f: &Frame) -> R<JV> {
        match &node.value {
            Value::String(s) => self.eval_string(s, node.span, f),
            Value::Array(items) => {
                self.enter(node.span)?;
                let mut out = Vec::with_capacity(items.len());
                let mut failed = false;
                for it in items {
                    match self.eval_json(it, f) {
                        Ok(v) => out.push(v),
                        Err(Failed) => failed = true,
                    }
                }
                self.leave();
                if failed {
                    Err(Failed)
                } else {
                    Ok(JV::Array(out))
                }
            }
            Value::Object(members) => {
                self.enter(node.span)?;
                let mut out = Map::new();
                let mut failed = false;
                for (k, v) in members {
                    if k.name == "copy" && is_copy_array(v) {
                        for spec in v.as_array().unwrap_or(&[]) {
                            match self.copy_json(spec, f) {
                                Ok((name, items)) => {
                                    out.insert(name, items);
                                }
                                Err(Failed) => failed = true,
                            }
                        }
                        continue;
                    }
                    let key = self.eval_key(k, f);
                    let val = self.eval_json(v, f);
                    match (key, val) {
                        (Ok(key), Ok(val)) => {
                            out.insert(key, val);
                        }
                        _ => failed = true,
                    }
                }
                self.leave();
                if failed {
                    Err(Failed)
                } else {
                    Ok(JV::Object(out))
                }
            }
            _ => Ok(node.to_json()),
        }
    }

    /// The loop name and count of a copy entry `{"name", "count", "input"}`.
    fn copy_header<'n>(&mut self, spec: &'n Node, f: &Frame) -> R<(String, i64, &'n Node)> {
        let Some(name) = spec.get_ci("name").and_then(|(_, n)| n.as_str()) else {
            return Err(self.fail(
                spec.span,
                "a copy loop needs a literal \"name\"",
                "write {\"name\": \"x\", \"count\": N, \"input\": ...}",
            ));
        };
        let Some((_, input)) = spec.get_ci("input") else {
            return Err(self.fail(
                spec.span,
                format!("copy loop '{name}' has no \"input\""),
                "add \"input\": the value of each element",
            ));
        };
        let Some((_, count_node)) = spec.get_ci("count") else {
            return Err(self.fail(
                spec.span,
                format!("copy loop '{name}' has no \"count\""),
                "add \"count\": the number of elements",
            ));
        };
        let count = self.eval_json(count_node, f)?;
        match as_int(&count) {
            Some(n) if (0..=MAX_COPY).contains(&n) => Ok((name.to_string(), n, input)),
            _ => Err(self.fail(
                count_node.span,
                format!("the count of copy loop '{name}' must be an integer from 0 to {MAX_COPY}, got {}", short(&count)),
                "fix the count expression",
            )),
        }
    }

    fn copy_json(&mut self, spec: &Node, f: &Frame) -> R<(String, JV)> {
        let (name, count, input) = self.copy_header(spec, f)?;
        let mut items = Vec::new();
        for i in 0..count {
            items.push(self.eval_json(input, &f.with_loop(&name, i))?);
        }
        Ok((name, JV::Array(items)))
    }

    /// Evaluates a JSON tree, keeping what cannot be evaluated (and recording its span).
    fn eval_tree(&mut self, node: &Node, f: &Frame, unresolved: &mut Vec<Span>) -> Node {
        match &node.value {
            Value::String(s) => match classify(s) {
                Lit::Plain => node.clone(),
                Lit::Escaped => Node::new(Value::String(s[1..].to_string()), node.span),
                Lit::Expr => match self.eval_string(s, node.span, f) {
                    Ok(v) => Node::from_json(&v, node.span),
                    Err(Failed) => {
                        unresolved.push(node.span);
                        node.clone()
                    }
                },
            },
            Value::Array(items) => {
                if self.enter(node.span).is_err() {
                    unresolved.push(node.span);
                    return node.clone();
                }
                let out = items
                    .iter()
                    .map(|n| self.eval_tree(n, f, unresolved))
                    .collect();
                self.leave();
                Node::new(Value::Array(out), node.span)
            }
            Value::Object(members) => {
                if self.enter(node.span).is_err() {
                    unresolved.push(node.span);
                    return node.clone();
                }
                let mut out = Vec::with_capacity(members.len());
                for (k, v) in members {
                    if k.name == "copy" && is_copy_array(v) {
                        self.copy_tree(k, v, f, unresolved, &mut out);
                        continue;
                    }
                    let key = match classify(&k.name) {
                        Lit::Plain => k.clone(),
                        Lit::Escaped => Key {
                            name: k.name[1..].to_string(),
                            span: k.span,
                        },
                        Lit::Expr => match self.eval_key(k, f) {
                            Ok(name) => Key { name, span: k.span },
                            Err(Failed) => {
                                unresolved.push(k.span);
                                k.clone()
                            }
                        },
                    };
                    let val = self.eval_tree(v, f, unresolved);
                    out.push((key, val));
                }
                self.leave();
                Node::new(Value::Object(out), node.span)
            }
            _ => node.clone(),
        }
    }

    /// Expands a property `copy` array into the properties it defines.
    fn copy_tree(
        &mut self,
        k: &Key,
        v: &Node,
        f: &Frame,
        unresolved: &mut Vec<Span>,
        out: &mut Vec<(Key, Node)>,
    ) {
        let specs = v.as_array().unwrap_or(&[]);
        let mut headers = Vec::new();
        for spec in specs {
            match self.copy_header(spec, f) {
                Ok(h) => headers.push((h, spec)),
                Err(Failed) => {
                    unresolved.push(v.span);
                    out.push((k.clone(), v.clone()));
                    return;
                }
            }
        }
        for ((name, count, input), spec) in headers {
            let name_span = spec.get_ci("name").map_or(spec.span, |(_, n)| n.span);
            let items = (0..count)
                .map(|i| self.eval_tree(input, &f.with_loop(&name, i), unresolved))
                .collect();
            out.push((
                Key {
                    name,
                    span: name_span,
                },
                Node::new(Value::Array(items), spec.span),
            ));
        }
    }

    // -- resources -----------------------------------------------------------------------------------

    fn walk(
        &mut self,
        resources: &'t Node,
        scope: usize,
        out: &mut Vec<EvaluatedResource>,
        level: usize,
    ) {
        let list: Vec<&'t Node> = match &resources.value {
            Value::Array(a) => a.iter().collect(),
            Value::Object(m) => m.iter().map(|(_, n)| n).collect(),
            _ => return,
        };
        for res in list {
            let ty = res
                .get_ci("type")
                .and_then(|(_, t)| t.as_str())
                .unwrap_or("");
            let existing = matches!(
                res.get_ci("existing").map(|(_, e)| &e.value),
                Some(Value::Bool(true))
            );
            if ty.eq_ignore_ascii_case(IMAGE_TEMPLATE_TYPE) {
                if !existing {
                    self.eval_resource(res, scope, out);
                }
            } else if ty.eq_ignore_ascii_case(DEPLOYMENT_TYPE) && level < MAX_NESTED_DEPLOYMENTS {
                self.nested_deployment(res, scope, out, level);
            }
            if let Some((_, children)) = res.get_ci("resources") {
                if level < MAX_NESTED_DEPLOYMENTS {
                    self.walk(children, scope, out, level + 1);
                }
            }
        }
    }

    /// Whether a condition (if any) lets the resource be deployed.
    fn condition_holds(&mut self, res: &Node, f: &Frame) -> bool {
        let Some((_, cond)) = res.get_ci("condition") else {
            return true;
        };
        match self.eval_json(cond, f) {
            Ok(JV::Bool(b)) => b,
            Ok(JV::String(s)) if s.eq_ignore_ascii_case("false") => false,
            Ok(JV::String(s)) if s.eq_ignore_ascii_case("true") => true,
            Ok(other) => {
                self.diag(
                    ARM_EXPRESSION_ERROR,
                    cond.span,
                    format!(
                        "a resource condition must be a boolean, got {}",
                        short(&other)
                    ),
                    "make the condition evaluate to true or false",
                );
                true
            }
            Err(Failed) => true,
        }
    }

    fn eval_resource(&mut self, res: &'t Node, scope: usize, out: &mut Vec<EvaluatedResource>) {
        let base = Frame::new(scope);
        if !self.condition_holds(res, &base) {
            self.skipped += 1;
            return;
        }
        if let Some((_, copy)) = res.get_ci("copy") {
            if copy.as_object().is_some() {
                // On failure (reported) the resource is evaluated once below; copyIndex() will
                // not resolve there.
                if let Some((name, count)) = self.copy_header_resource(copy, &base) {
                    if count == 0 {
                        self.skipped += 1;
                    }
                    for i in 0..count {
                        let f = Frame {
                            res_loop: Some((name.clone(), i)),
                            ..base.clone()
                        };
                        let mut unresolved = Vec::new();
                        let node = self.eval_tree(res, &f, &mut unresolved);
                        out.push(EvaluatedResource { node, unresolved });
                    }
                    return;
                }
            }
        }
        let mut unresolved = Vec::new();
        let node = self.eval_tree(res, &base, &mut unresolved);
        out.push(EvaluatedResource { node, unresolved });
    }

    fn copy_header_resource(&mut self, copy: &Node, f: &Frame) -> Option<(String, i64)> {
        let name = copy
            .get_ci("name")
            .and_then(|(_, n)| n.as_str())
            .unwrap_or("")
            .to_string();
        let Some((_, count_node)) = copy.get_ci("count") else {
            self.diag(
                ARM_EXPRESSION_ERROR,
                copy.span,
                "a resource copy loop needs a \"count\"",
                "add \"count\": the number of resources",
            );
            return None;
        };
        let count = self.eval_json(count_node, f).ok()?;
        match as_int(&count) {
            Some(n) if (0..=MAX_COPY).contains(&n) => Some((name, n)),
            _ => {
                self.diag(
                    ARM_EXPRESSION_ERROR,
                    count_node.span,
                    format!(
                        "a resource copy count must be an integer from 0 to {MAX_COPY}, got {}",
                        short(&count)
                    ),
                    "fix the count expression",
                );
                None
            }
        }
    }

    fn nested_deployment(
        &mut self,
        res: &'t Node,
        scope: usize,
        out: &mut Vec<EvaluatedResource>,
        level: usize,
    ) {
        let Some((_, props)) = res.get_ci("properties") else {
            return;
        };
        let Some((_, tpl)) = props.get_ci("template") else {
            if props.get_ci("templateLink").is_some() {
                self.linked += 1;
            }
            return;
        };
        if !contains_image_template(tpl, 0) {
            return;
        }
        let outer = Frame::new(scope);
        if !self.condition_holds(res, &outer) {
            self.skipped += 1;
            return;
        }
        let Some((_, resources)) = tpl.get_ci("resources") else {
            return;
        };
        let inner = props
            .get_ci("expressionEvaluationOptions")
            .and_then(|(_, o)| o.get_ci("scope"))
            .and_then(|(_, s)| s.as_str())
            .is_some_and(|s| s.eq_ignore_ascii_case("inner"));
        if !inner {
            // Outer scope (ARM's default): the nested template's expressions see the parent's
            // parameters, variables and context.
            self.walk(resources, scope, out, level + 1);
            return;
        }
        let mut ctx = self.scopes[scope].ctx.clone();
        let text = |ev: &mut Self, key: &str| -> Option<String> {
            let (_, n) = res.get_ci(key)?;
            match ev.eval_json(n, &outer) {
                Ok(JV::String(s)) => Some(s),
                _ => None,
            }
        };
        if let Some(rg) = text(self, "resourceGroup") {
            ctx.rg = rg;
            ctx.rg_scope = true;
        }
        if let Some(sub) = text(self, "subscriptionId") {
            ctx.sub = sub;
        }
        if let Some(name) = text(self, "name") {
            ctx.deployment = name;
        }
        ctx.content_version = content_version(tpl);
        let params = props.get_ci("parameters").map(|(_, p)| p);
        let new = self.build_scope(
            tpl,
            ctx,
            ParamInput::Nested {
                outer: scope,
                params,
            },
        );
        self.walk(resources, new, out, level + 1);
    }
}

fn is_copy_array(v: &Node) -> bool {
    match v.as_array() {
        Some(specs) if !specs.is_empty() => specs
            .iter()
            .all(|s| s.get_ci("name").is_some() && s.get_ci("input").is_some()),
        _ => false,
    }
}

/// Whether a (nested) template holds an image template resource anywhere it can be deployed
/// from.
fn contains_image_template(tpl: &Node, level: usize) -> bool {
    if level > MAX_NESTED_DEPLOYMENTS {
        return false;
    }
    let Some((_, resources)) = tpl.get_ci("resources") else {
        return false;
    };
    let list: Vec<&Node> = match &resources.value {
        Value::Array(a) => a.iter().collect(),
        Value::Object(m) => m.iter().map(|(_, n)| n).collect(),
        _ => return false,
    };
    list.into_iter().any(|res| {
        let ty = res
            .get_ci("type")
            .and_then(|(_, t)| t.as_str())
            .unwrap_or("");
        ty.eq_ignore_ascii_case(IMAGE_TEMPLATE_TYPE)
            || contains_image_template(res, level + 1)
            || res
                .get_ci("properties")
                .and_then(|(_, p)| p.get_ci("template"))
                .is_some_and(|(_, t)| contains_image_template(t, level + 1))
    })
}

fn article(kind: &str) -> &'static str {
    match kind.as_bytes().first() {
        Some(b'a' | b'e' | b'i' | b'o' | b'u') => "an",
        _ => "a",
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let t: String = s.chars().take(n).collect();
        format!("{t}...")
    }
}

/// A short rendering of a value for messages.
fn short(v: &JV) -> String {
    truncate(&serde_json::to_string(v).unwrap_or_default(), 60)
}

// ---------------------------------------------------------------------------------------------
// Expressions and functions
// ---------------------------------------------------------------------------------------------

/// The functions kiln evaluates (lower case), for messages and for dispatch.
const SUPPORTED: &[&str] = &[
    "add",
    "and",
    "array",
    "base64",
    "base64ToJson",
    "base64ToString",
    "bool",
    "coalesce",
    "concat",
    "contains",
    "copyIndex",
    "createArray",
    "createObject",
    "dataUri",
    "dataUriToString",
    "deployment",
    "div",
    "empty",
    "endsWith",
    "environment",
    "equals",
    "extensionResourceId",
    "false",
    "filter",
    "first",
    "format",
    "greater",
    "greaterOrEquals",
    "guid",
    "if",
    "indexOf",
    "int",
    "intersection",
    "items",
    "join",
    "json",
    "lambda",
    "lambdaVariables",
    "last",
    "lastIndexOf",
    "length",
    "less",
    "lessOrEquals",
    "map",
    "max",
    "min",
    "mod",
    "mul",
    "newGuid",
    "not",
    "null",
    "objectKeys",
    "or",
    "padLeft",
    "parameters",
    "range",
    "reduce",
    "replace",
    "resourceGroup",
    "resourceId",
    "skip",
    "sort",
    "split",
    "startsWith",
    "string",
    "sub",
    "subscription",
    "subscriptionResourceId",
    "substring",
    "take",
    "tenant",
    "tenantResourceId",
    "toLower",
    "toObject",
    "toUpper",
    "trim",
    "true",
    "union",
    "uniqueString",
    "uri",
    "uriComponent",
    "uriComponentToString",
    "utcNow",
    "variables",
];

/// ARM functions that kiln knows but does not evaluate.
const KNOWN_UNSUPPORTED: &[&str] = &[
    "datetimeadd",
    "datetimefromepoch",
    "datetimetoepoch",
    "managementgroup",
    "managementgroupresourceid",
    "tryget",
    "indexfromend",
    "tryindexfromend",
    "parsecidr",
    "cidrsubnet",
    "cidrhost",
    "groupby",
    "mapvalues",
    "shallowmerge",
    "float",
    "objectvalues",
    "externalinput",
    "deployer",
];

fn supported_list() -> String {
    SUPPORTED.join(", ")
}

fn is_supported(lname: &str) -> bool {
    SUPPORTED.iter().any(|s| s.eq_ignore_ascii_case(lname))
}

/// Functions that read live Azure state.
fn needs_azure(lname: &str) -> bool {
    lname == "reference"
        || lname == "pickzones"
        || lname == "providers"
        || lname.starts_with("list")
}

fn as_int(v: &JV) -> Option<i64> {
    match v {
        JV::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                .map(|f| f as i64)
        }),
        _ => None,
    }
}

/// Deep equality, numbers compared by value.
fn jv_eq(a: &JV, b: &JV) -> bool {
    match (a, b) {
        (JV::Number(x), JV::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i == j,
            _ => x.as_f64() == y.as_f64(),
        },
        (JV::Array(x), JV::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| jv_eq(p, q))
        }
        (JV::Object(x), JV::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| jv_eq(v, w)))
        }
        _ => a == b,
    }
}

/// ARM's (.NET's) text form of a value: `True`/`False` for booleans, compact JSON for arrays
/// and objects, nothing for null.
fn text_of(v: &JV) -> String {
    match v {
        JV::String(s) => s.clone(),
        JV::Bool(true) => "True".into(),
        JV::Bool(false) => "False".into(),
        JV::Null => String::new(),
        JV::Number(n) => n.to_string(),
        _ => serde_json::to_string(v).unwrap_or_default(),
    }
}

impl<'t> Eval<'t> {
    fn eval(&mut self, e: &Ex, f: &Frame, src: Src) -> R<JV> {
        let span = src.at(e.at);
        self.tick(1, span)?;
        self.enter(span)?;
        let r = self.eval_inner(e, f, src);
        self.leave();
        r
    }

    fn eval_inner(&mut self, e: &Ex, f: &Frame, src: Src) -> R<JV> {
        match &e.kind {
            ExKind::Str(s) => Ok(JV::String(s.clone())),
            ExKind::Int(n) => Ok(JV::from(*n)),
            ExKind::Bool(b) => Ok(JV::Bool(*b)),
            ExKind::Null => Ok(JV::Null),
            ExKind::Prop { target, name } => {
                let t = self.eval(target, f, src)?;
                self.property(t, name, src.at((target.at.1, e.at.1)))
            }
            ExKind::Index { target, index } => {
                let t = self.eval(target, f, src)?;
                let i = self.eval(index, f, src)?;
                self.index(t, i, src.at((target.at.1, e.at.1)))
            }
            ExKind::Call {
                name,
                name_at,
                args,
            } => {
                let site = Site {
                    name,
                    name_span: src.at(*name_at),
                    span: src.at(e.at),
                    args,
                    src,
                };
                self.call(&site, f)
            }
        }
    }

    fn property(&mut self, t: JV, name: &str, span: Span) -> R<JV> {
        match t {
            JV::Object(mut m) => {
                if let Some(v) = m.remove(name) {
                    return Ok(v);
                }
                let key = m.keys().find(|k| k.eq_ignore_ascii_case(name)).cloned();
                match key.and_then(|k| m.remove(&k)) {
                    Some(v) => Ok(v),
                    None => {
                        let available: Vec<&str> = m.keys().map(String::as_str).collect();
                        let available = if available.is_empty() {
                            "none".to_string()
                        } else {
                            truncate(&available.join(", "), 200)
                        };
                        Err(self.fail(
                            span,
                            format!("property '{name}' doesn't exist; available properties: {available}"),
                            "fix the property name",
                        ))
                    }
                }
            }
            other => Err(self.fail(
                span,
                format!(
                    "cannot read property '{name}' of {} {} value",
                    article(kind(&other)),
                    kind(&other)
                ),
                "property access works on objects only",
            )),
        }
    }

    fn index(&mut self, t: JV, i: JV, span: Span) -> R<JV> {
        match (t, i) {
            (JV::Array(mut a), i) => match as_int(&i) {
                Some(n) if n >= 0 && (n as u64) < a.len() as u64 => Ok(a.swap_remove(n as usize)),
                Some(n) => Err(self.fail(
                    span,
                    format!(
                        "index {n} is out of range: the array has {} elements",
                        a.len()
                    ),
                    "use an index from 0 to length(...) - 1",
                )),
                None => Err(self.fail(
                    span,
                    format!("an array index must be an integer, got {}", short(&i)),
                    "use an integer index",
                )),
            },
            (JV::Object(m), JV::String(k)) => self.property(JV::Object(m), &k, span),
            (JV::Object(_), i) => Err(self.fail(
                span,
                format!("an object index must be a string, got {}", short(&i)),
                "use a property name string",
            )),
            (other, _) => Err(self.fail(
                span,
                format!(
                    "cannot index {} {} value",
                    article(kind(&other)),
                    kind(&other)
                ),
                "indexes work on arrays and objects only",
            )),
        }
    }

    fn call(&mut self, c: &Site, f: &Frame) -> R<JV> {
        let lname = c.name.to_ascii_lowercase();
        match lname.as_str() {
            "if" => return self.f_if(c, f),
            "and" | "or" => return self.f_and_or(c, f, lname == "and"),
            "coalesce" => return self.f_coalesce(c, f),
            "map" | "filter" | "reduce" | "sort" | "toobject" => {
                return self.f_lambda(&lname, c, f)
            }
            "lambda" => {
                return Err(self.fail(
                    c.name_span,
                    "lambda() can only be an argument of map, filter, reduce, sort or toObject",
                    "pass the lambda to one of those functions",
                ))
            }
            _ => {}
        }
        if lname.contains('.') {
            return self.user_fn(&lname, c, f);
        }
        if needs_azure(&lname) || !is_supported(&lname) {
            return Err(self.report_unknown(&lname, c));
        }
        let mut vals = Vec::with_capacity(c.args.len());
        let mut failed = false;
        for a in c.args {
            match self.eval(a, f, c.src) {
                Ok(v) => vals.push(v),
                Err(Failed) => failed = true,
            }
        }
        if failed {
            return Err(Failed);
        }
        let v = match lname.as_str() {
            "parameters" | "variables" | "copyindex" | "lambdavariables" => {
                return self.scoped(&lname, c, vals, f)
            }
            _ => self.builtin(&lname, c, vals, f)?,
        };
        self.charge(&v, c.span)?;
        Ok(v)
    }

    #[cold]
    #[inline(never)]
    fn report_unknown(&mut self, lname: &str, c: &Site) -> Failed {
        if needs_azure(lname) {
            self.diag(
                UNSUPPORTED_ARM_FUNCTION,
                c.name_span,
                format!(
                    "{}() reads the live state of Azure resources: kiln evaluates templates locally and cannot call Azure. Functions kiln evaluates: {}",
                    c.name,
                    supported_list()
                ),
                "replace this expression with the literal value (for example the resource ID or key), or make it a template parameter and pass it with -p NAME=VALUE",
            );
        } else if KNOWN_UNSUPPORTED.contains(&lname) {
            self.diag(
                UNSUPPORTED_ARM_FUNCTION,
                c.name_span,
                format!("kiln does not evaluate the ARM function {}(). Functions kiln evaluates: {}", c.name, supported_list()),
                "replace this expression with its literal value, or compute it into a parameter and pass it with -p NAME=VALUE",
            );
        } else {
            self.diag(
                ARM_EXPRESSION_ERROR,
                c.name_span,
                format!("'{}' is not an ARM template function (and the template defines no such user function)", c.name),
                format!("check the spelling; ARM template functions kiln evaluates: {}", supported_list()),
            );
        }
        Failed
    }

    fn arity(&mut self, c: &Site, n: usize, min: usize, max: usize) -> R<()> {
        if n >= min && n <= max {
            return Ok(());
        }
        let want = if min == max {
            format!("{min} argument{}", if min == 1 { "" } else { "s" })
        } else if max == usize::MAX {
            format!("at least {min} argument{}", if min == 1 { "" } else { "s" })
        } else {
            format!("{min} to {max} arguments")
        };
        Err(self.fail(
            c.span,
            format!("{}() takes {want}, got {n}", c.name),
            format!("call {}() with {want}", c.name),
        ))
    }

    fn type_err(&mut self, c: &Site, i: usize, want: &str, got: &JV) -> Failed {
        let ord = match i {
            0 => "first",
            1 => "second",
            2 => "third",
            3 => "fourth",
            _ => "an",
        };
        self.fail(
            c.arg(i),
            format!(
                "the {ord} argument of {}() must be {want}, got {} {}",
                c.name,
                article(kind(got)),
                kind(got)
            ),
            format!("pass {want}"),
        )
    }

    fn str_arg<'v>(&mut self, c: &Site, v: &'v [JV], i: usize) -> R<&'v str> {
        match &v[i] {
            JV::String(s) => Ok(s),
            other => Err(self.type_err(c, i, "a string", other)),
        }
    }

    fn int_arg(&mut self, c: &Site, v: &[JV], i: usize) -> R<i64> {
        match as_int(&v[i]) {
            Some(n) => Ok(n),
            None => Err(self.type_err(c, i, "an integer", &v[i])),
        }
    }

    fn bool_arg(&mut self, c: &Site, v: &JV, i: usize) -> R<bool> {
        match v {
            JV::Bool(b) => Ok(*b),
            other => Err(self.type_err(c, i, "a boolean", other)),
        }
    }

    fn too_long(&mut self, c: &Site, len: usize) -> R<()> {
        if len > MAX_STRING_BYTES {
            return Err(self.fail(
                c.span,
                format!(
                    "{}() would build a string longer than {} MiB",
                    c.name,
                    MAX_STRING_BYTES >> 20
                ),
                "build smaller strings",
            ));
        }
        Ok(())
    }

    // -- lazily evaluated functions ------------------------------------------------------------------

    fn f_if(&mut self, c: &Site, f: &Frame) -> R<JV> {
        self.arity(c, c.args.len(), 3, 3)?;
        let cond = self.eval(&c.args[0], f, c.src)?;
        let b = self.bool_arg(c, &cond, 0)?;
        self.eval(&c.args[if b { 1 } else { 2 }], f, c.src)
    }

    fn f_and_or(&mut self, c: &Site, f: &Frame, and: bool) -> R<JV> {
        self.arity(c, c.args.len(), 2, usize::MAX)?;
        for (i, a) in c.args.iter().enumerate() {
            let v = self.eval(a, f, c.src)?;
            let b = self.bool_arg(c, &v, i)?;
            if b != and {
                return Ok(JV::Bool(!and));
            }
        }
        Ok(JV::Bool(and))
    }

    fn f_coalesce(&mut self, c: &Site, f: &Frame) -> R<JV> {
        self.arity(c, c.args.len(), 1, usize::MAX)?;
        for a in c.args {
            let v = self.eval(a, f, c.src)?;
            if !v.is_null() {
                return Ok(v);
            }
        }
        Ok(JV::Null)
    }

    /// The parameter names and body of `lambda('a', 'b', body)`.
    fn lambda_of<'e>(
        &mut self,
        c: &Site,
        e: &'e Ex,
        min: usize,
        max: usize,
    ) -> R<(Vec<String>, &'e Ex)> {
        if let ExKind::Call { name, args, .. } = &e.kind {
            if name.eq_ignore_ascii_case("lambda") && args.len() >= 2 {
                let (body, names) = args.split_last().ok_or(Failed)?;
                let mut out = Vec::new();
                for n in names {
                    match &n.kind {
                        ExKind::Str(s) => out.push(s.clone()),
                        _ => {
                            return Err(self.fail(
                                c.src.at(n.at),
                                "lambda variable names must be string literals",
                                "write lambda('x', ...)",
                            ))
                        }
                    }
                }
                if out.len() < min || out.len() > max {
                    return Err(self.fail(
                        c.src.at(e.at),
                        format!(
                            "the lambda given to {}() must take {} variable{}, it takes {}",
                            c.name,
                            if min == max {
                                min.to_string()
                            } else {
                                format!("{min} or {max}")
                            },
                            if max == 1 { "" } else { "s" },
                            out.len()
                        ),
                        "fix the lambda's variable list",
                    ));
                }
                return Ok((out, body));
            }
        }
        Err(self.fail(
            c.src.at(e.at),
            format!("{}() expects lambda('x', ...) here", c.name),
            "pass a lambda expression",
        ))
    }

    fn with_lambda(f: &Frame, bind: &[(&String, JV)]) -> Frame {
        let mut f = f.clone();
        for (n, v) in bind {
            f.lambdas.push(((*n).clone(), v.clone()));
        }
        f
    }

    fn f_lambda(&mut self, lname: &str, c: &Site, f: &Frame) -> R<JV> {
        let (min, max) = match lname {
            "reduce" => (3, 3),
            "toobject" => (2, 3),
            _ => (2, 2),
        };
        self.arity(c, c.args.len(), min, max)?;
        let input = self.eval(&c.args[0], f, c.src)?;
        let JV::Array(items) = input else {
            return Err(self.type_err(c, 0, "an array", &input));
        };
        match lname {
            "filter" | "map" => {
                let (vars, body) =
                    self.lambda_of(c, &c.args[1], 1, if lname == "map" { 2 } else { 1 })?;
                let mut out = Vec::new();
                for (i, item) in items.into_iter().enumerate() {
                    let mut bind = vec![(&vars[0], item.clone())];
                    if let Some(iv) = vars.get(1) {
                        bind.push((iv, JV::from(i)));
                    }
                    let r = self.eval(body, &Self::with_lambda(f, &bind), c.src)?;
                    if lname == "map" {
                        out.push(r);
                    } else if self.bool_arg(c, &r, 1)? {
                        out.push(item);
                    }
                }
                Ok(JV::Array(out))
            }
            "reduce" => {
                let mut acc = self.eval(&c.args[1], f, c.src)?;
                let (vars, body) = self.lambda_of(c, &c.args[2], 2, 3)?;
                for (i, item) in items.into_iter().enumerate() {
                    let mut bind = vec![(&vars[0], acc), (&vars[1], item)];
                    if let Some(iv) = vars.get(2) {
                        bind.push((iv, JV::from(i)));
                    }
                    acc = self.eval(body, &Self::with_lambda(f, &bind), c.src)?;
                }
                Ok(acc)
            }
            "sort" => {
                let (vars, body) = self.lambda_of(c, &c.args[1], 2, 2)?;
                // Bottom-up merge sort (stable) with a comparator that can fail.
                let mut v = items;
                let n = v.len();
                let mut width = 1;
                while width < n {
                    let mut merged = Vec::with_capacity(n);
                    let mut start = 0;
                    while start < n {
                        let mid = (start + width).min(n);
                        let end = (start + 2 * width).min(n);
                        let (mut i, mut j) = (start, mid);
                        while i < mid && j < end {
                            let bind = [(&vars[0], v[j].clone()), (&vars[1], v[i].clone())];
                            let r = self.eval(body, &Self::with_lambda(f, &bind), c.src)?;
                            // take the right element first only if it sorts strictly before the left one
                            if self.bool_arg(c, &r, 1)? {
                                merged.push(v[j].clone());
                                j += 1;
                            } else {
                                merged.push(v[i].clone());
                                i += 1;
                            }
                        }
                        merged.extend_from_slice(&v[i..mid]);
                        merged.extend_from_slice(&v[j..end]);
                        start = end;
                    }
                    v = merged;
                    width *= 2;
                }
                Ok(JV::Array(v))
            }
            _ => {
                // toObject
                let (kv, kbody) = self.lambda_of(c, &c.args[1], 1, 1)?;
                let vlam = match c.args.get(2) {
                    Some(a) => Some(self.lambda_of(c, a, 1, 1)?),
                    None => None,
                };
                let mut out = Map::new();
                for item in items {
                    let key = self.eval(
                        kbody,
                        &Self::with_lambda(f, &[(&kv[0], item.clone())]),
                        c.src,
                    )?;
                    let JV::String(key) = key else {
                        return Err(self.type_err(c, 1, "a lambda returning a string key", &key));
                    };
                    let val = match &vlam {
                        Some((vv, vbody)) => {
                            self.eval(vbody, &Self::with_lambda(f, &[(&vv[0], item)]), c.src)?
                        }
                        None => item,
                    };
                    out.insert(key, val);
                }
                Ok(JV::Object(out))
            }
        }
    }

    fn user_fn(&mut self, lname: &str, c: &Site, f: &Frame) -> R<JV> {
        let scope = f.scope;
        let Some(i) = self.scopes[scope]
            .funcs
            .iter()
            .position(|u| u.name == lname)
        else {
            return Err(self.fail(
                c.name_span,
                format!("the template defines no user function '{}'", c.name),
                "define it under \"functions\" or fix the name",
            ));
        };
        let node = self.scopes[scope].funcs[i].node;
        let decls: Vec<String> = node
            .get_ci("parameters")
            .and_then(|(_, p)| p.as_array())
            .unwrap_or(&[])
            .iter()
            .map(|p| {
                p.get_ci("name")
                    .and_then(|(_, n)| n.as_str())
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        self.arity(c, c.args.len(), decls.len(), decls.len())?;
        let Some((_, out)) = node.get_ci("output").and_then(|(_, o)| o.get_ci("value")) else {
            return Err(self.fail(
                c.name_span,
                format!("user function '{}' has no output.value", c.name),
                "add \"output\": {\"type\": ..., \"value\": ...}",
            ));
        };
        let mut bound = Vec::new();
        for (name, a) in decls.into_iter().zip(c.args) {
            bound.push((name, self.eval(a, f, c.src)?));
        }
        let frame = Frame {
            scope,
            fn_args: Some(Rc::new(bound)),
            ..Frame::default()
        };
        self.enter(c.span)?;
        let r = self.eval_json(out, &frame);
        self.leave();
        r
    }

    /// `parameters()` and `variables()`. Chains of variables recurse through here, so this
    /// frame is kept small: messages are built in `lookup_failed`.
    fn scoped(&mut self, lname: &str, c: &Site, v: Vec<JV>, f: &Frame) -> R<JV> {
        if lname != "parameters" && lname != "variables" {
            return self.loop_vars(lname, c, &v, f);
        }
        self.arity(c, v.len(), 1, 1)?;
        let name = self.str_arg(c, &v, 0)?;
        let is_param = lname == "parameters";
        if let Some(args) = &f.fn_args {
            if let Some(i) = find_ci(args, name, |a| &a.0).filter(|_| is_param) {
                return Ok(args[i].1.clone());
            }
            return Err(self.lookup_failed(lname, name, c, f));
        }
        if !is_param && f.in_param_default {
            return Err(self.lookup_failed(lname, name, c, f));
        }
        let scope = f.scope;
        let found = if is_param {
            find_ci(&self.scopes[scope].params, name, |p| &p.name)
        } else {
            find_ci(&self.scopes[scope].vars, name, |x| &x.name)
        };
        match found {
            Some(i) if is_param => self.param_value(scope, i, c.span),
            Some(i) => self.var_value(scope, i, c.span),
            None => Err(self.lookup_failed(lname, name, c, f)),
        }
    }

    #[cold]
    #[inline(never)]
    fn lookup_failed(&mut self, lname: &str, name: &str, c: &Site, f: &Frame) -> Failed {
        let is_param = lname == "parameters";
        if f.fn_args.is_some() {
            return if is_param {
                self.fail(
                    c.arg(0),
                    format!("'{name}' is not a parameter of this user function (a user function can only use its own parameters)"),
                    "pass the value as an argument of the function",
                )
            } else {
                self.fail(
                    c.name_span,
                    "a user function cannot use variables()",
                    "pass the value as an argument of the function",
                )
            };
        }
        if !is_param && f.in_param_default {
            return self.fail(
                c.name_span,
                "variables() cannot be used in a parameter's defaultValue",
                "compute the value in a variable instead",
            );
        }
        let scope = &self.scopes[f.scope];
        if is_param {
            let declared = names(&scope.params, |p| &p.name);
            self.fail(
                c.arg(0),
                format!("the template declares no parameter '{name}' (declared: {declared})"),
                "declare it under \"parameters\" or fix the name",
            )
        } else {
            let declared = names(&scope.vars, |x| &x.name);
            self.fail(
                c.arg(0),
                format!("the template declares no variable '{name}' (declared: {declared})"),
                "declare it under \"variables\" or fix the name",
            )
        }
    }

    /// `copyIndex()` and `lambdaVariables()`.
    fn loop_vars(&mut self, lname: &str, c: &Site, v: &[JV], f: &Frame) -> R<JV> {
        let n = v.len();
        if lname == "lambdavariables" {
            self.arity(c, n, 1, 1)?;
            let name = self.str_arg(c, v, 0)?;
            return match f
                .lambdas
                .iter()
                .rev()
                .find(|(l, _)| l.eq_ignore_ascii_case(name))
            {
                Some((_, val)) => Ok(val.clone()),
                None => Err(self.fail(
                    c.arg(0),
                    format!("no lambda variable '{name}' is in scope"),
                    "use a variable name of an enclosing lambda",
                )),
            };
        }
        self.arity(c, n, 0, 2)?;
        let (name, offset) = match (v.first(), v.get(1)) {
            (None, _) => (None, 0),
            (Some(JV::String(s)), None) => (Some(s.as_str()), 0),
            (Some(JV::String(s)), Some(_)) => (Some(s.as_str()), self.int_arg(c, v, 1)?),
            (Some(_), None) => (None, self.int_arg(c, v, 0)?),
            (Some(other), Some(_)) => return Err(self.type_err(c, 0, "a loop name", other)),
        };
        let idx = match name {
            Some(name) => f
                .loops
                .iter()
                .rev()
                .chain(f.res_loop.iter())
                .find(|(l, _)| l.eq_ignore_ascii_case(name))
                .map(|(_, i)| *i),
            None => f.res_loop.as_ref().map(|(_, i)| *i),
        };
        match idx {
            Some(i) => Ok(JV::from(i + offset)),
            None => Err(self.fail(
                c.span,
                match name {
                    Some(name) => format!("copyIndex('{name}'): no copy loop named '{name}' encloses this expression"),
                    None => "copyIndex() without a loop name is only valid inside a resource with a copy loop".to_string(),
                },
                "use copyIndex inside the copy loop it refers to, naming property and variable loops: copyIndex('name')",
            )),
        }
    }

    // -- everything else -------------------------------------------------------------------------------

    fn builtin(&mut self, lname: &str, c: &Site, v: Vec<JV>, f: &Frame) -> R<JV> {
        let n = v.len();
        match lname {
            "true" | "false" | "null" => {
                self.arity(c, n, 0, 0)?;
                Ok(match lname {
                    "true" => JV::Bool(true),
                    "false" => JV::Bool(false),
                    _ => JV::Null,
                })
            }
            "concat" => {
                self.arity(c, n, 1, usize::MAX)?;
                if v[0].is_array() {
                    let mut out = Vec::new();
                    for (i, a) in v.into_iter().enumerate() {
                        match a {
                            JV::Array(items) => out.extend(items),
                            JV::Null => {}
                            other => {
                                return Err(self.type_err(
                                    c,
                                    i,
                                    "an array (the first argument is one)",
                                    &other,
                                ))
                            }
                        }
                    }
                    return Ok(JV::Array(out));
                }
                let mut out = String::new();
                for (i, a) in v.iter().enumerate() {
                    match a {
                        JV::Array(_) | JV::Object(_) => {
                            return Err(self.type_err(
                                c,
                                i,
                                "a string, integer or boolean (the first argument is not an array)",
                                a,
                            ))
                        }
                        other => out.push_str(&text_of(other)),
                    }
                    self.too_long(c, out.len())?;
                }
                Ok(JV::String(out))
            }
            "format" => {
                self.arity(c, n, 1, usize::MAX)?;
                let fmt = self.str_arg(c, &v, 0)?.to_string();
                match dotnet_format(&fmt, &v[1..], MAX_STRING_BYTES) {
                    Ok(s) => Ok(JV::String(s)),
                    Err(msg) => Err(self.fail(
                        c.span,
                        format!("format(): {msg}"),
                        "placeholders look like {0}, {1:N0}; write {{ and }} for literal braces",
                    )),
                }
            }
            "tolower" | "toupper" => {
                self.arity(c, n, 1, 1)?;
                let s = self.str_arg(c, &v, 0)?;
                Ok(JV::String(if lname == "tolower" {
                    s.to_lowercase()
                } else {
                    s.to_uppercase()
                }))
            }
            "string" => {
                self.arity(c, n, 1, 1)?;
                Ok(JV::String(text_of(&v[0])))
            }
            "int" => {
                self.arity(c, n, 1, 1)?;
                match &v[0] {
                    JV::String(s) => match s.trim().parse::<i64>() {
                        Ok(i) => Ok(JV::from(i)),
                        Err(_) => Err(self.fail(
                            c.arg(0),
                            format!("int(): '{}' is not an integer", truncate(s, 40)),
                            "pass digits only, like int('42')",
                        )),
                    },
                    JV::Number(num) => match num.as_i64() {
                        Some(i) => Ok(JV::from(i)),
                        None => Ok(JV::from(num.as_f64().unwrap_or(0.0).trunc() as i64)),
                    },
                    other => Err(self.type_err(c, 0, "a string or a number", other)),
                }
            }
            "bool" => {
                self.arity(c, n, 1, 1)?;
                match &v[0] {
                    JV::Bool(b) => Ok(JV::Bool(*b)),
                    JV::String(s) if s.trim().eq_ignore_ascii_case("true") => Ok(JV::Bool(true)),
                    JV::String(s) if s.trim().eq_ignore_ascii_case("false") => Ok(JV::Bool(false)),
                    JV::Number(_) if as_int(&v[0]).is_some() => {
                        Ok(JV::Bool(as_int(&v[0]) != Some(0)))
                    }
                    other => {
                        Err(self.type_err(c, 0, "'true', 'false', a boolean or an integer", other))
                    }
                }
            }
            "replace" => {
                self.arity(c, n, 3, 3)?;
                let s = self.str_arg(c, &v, 0)?;
                let old = self.str_arg(c, &v, 1)?;
                let new = self.str_arg(c, &v, 2)?;
                if old.is_empty() {
                    return Err(self.fail(
                        c.arg(1),
                        "replace(): the string to replace must not be empty",
                        "pass a non-empty string to replace",
                    ));
                }
                let count = s.matches(old).count();
                self.too_long(c, s.len() + count.saturating_mul(new.len()))?;
                Ok(JV::String(s.replace(old, new)))
            }
            "substring" => {
                self.arity(c, n, 1, 3)?;
                let s = self.str_arg(c, &v, 0)?;
                let chars: Vec<char> = s.chars().collect();
                let start = if n > 1 { self.int_arg(c, &v, 1)? } else { 0 };
                let len = if n > 2 {
                    self.int_arg(c, &v, 2)?
                } else {
                    chars.len() as i64 - start
                };
                if start < 0 || len < 0 || start.saturating_add(len) > chars.len() as i64 {
                    return Err(self.fail(
                        c.span,
                        format!("substring(): start {start} and length {len} do not fit in a string of {} characters", chars.len()),
                        "the index and length must refer to a location within the string",
                    ));
                }
                Ok(JV::String(
                    chars[start as usize..(start + len) as usize]
                        .iter()
                        .collect(),
                ))
            }
            "length" => {
                self.arity(c, n, 1, 1)?;
                match &v[0] {
                    JV::String(s) => Ok(JV::from(s.chars().count())),
                    JV::Array(a) => Ok(JV::from(a.len())),
                    JV::Object(m) => Ok(JV::from(m.len())),
                    other => Err(self.type_err(c, 0, "a string, array or object", other)),
                }
            }
            "empty" => {
                self.arity(c, n, 1, 1)?;
                match &v[0] {
                    JV::Null => Ok(JV::Bool(true)),
                    JV::String(s) => Ok(JV::Bool(s.is_empty())),
                    JV::Array(a) => Ok(JV::Bool(a.is_empty())),
                    JV::Object(m) => Ok(JV::Bool(m.is_empty())),
                    other => Err(self.type_err(c, 0, "a string, array, object or null", other)),
                }
            }
            "equals" => {
                self.arity(c, n, 2, 2)?;
                Ok(JV::Bool(jv_eq(&v[0], &v[1])))
            }
            "not" => {
                self.arity(c, n, 1, 1)?;
                Ok(JV::Bool(!self.bool_arg(c, &v[0], 0)?))
            }
            "greater" | "greaterorequals" | "less" | "lessorequals" => {
                self.arity(c, n, 2, 2)?;
                let ord = match (&v[0], &v[1]) {
                    (JV::String(a), JV::String(b)) => a.cmp(b),
                    (JV::Number(a), JV::Number(b)) => a
                        .as_f64()
                        .unwrap_or(0.0)
                        .partial_cmp(&b.as_f64().unwrap_or(0.0))
                        .unwrap_or(std::cmp::Ordering::Equal),
                    (a, _) if !matches!(a, JV::String(_) | JV::Number(_)) => {
                        return Err(self.type_err(c, 0, "an integer or a string", a))
                    }
                    (_, b) => {
                        return Err(self.type_err(
                            c,
                            1,
                            "a value of the same type as the first argument",
                            b,
                        ))
                    }
                };
                use std::cmp::Ordering::*;
                Ok(JV::Bool(match lname {
                    "greater" => ord == Greater,
                    "greaterorequals" => ord != Less,
                    "less" => ord == Less,
                    _ => ord != Greater,
                }))
            }
            "createarray" => Ok(JV::Array(v)),
            "createobject" => {
                if n % 2 == 1 {
                    return Err(self.fail(
                        c.span,
                        format!("createObject() takes key/value pairs, got {n} arguments"),
                        "pass an even number of arguments: 'key1', value1, 'key2', value2",
                    ));
                }
                let mut out = Map::new();
                let mut it = v.into_iter().enumerate();
                while let (Some((i, k)), Some((_, val))) = (it.next(), it.next()) {
                    match k {
                        JV::String(k) => {
                            out.insert(k, val);
                        }
                        other => return Err(self.type_err(c, i, "a string key", &other)),
                    }
                }
                Ok(JV::Object(out))
            }
            "json" => {
                self.arity(c, n, 1, 1)?;
                let s = self.str_arg(c, &v, 0)?;
                match serde_json::from_str::<JV>(s) {
                    Ok(j) => Ok(j),
                    Err(e) => Err(self.fail(
                        c.arg(0),
                        format!("json(): the text is not valid JSON ({e})"),
                        "pass a JSON text, for example json('{\"a\": 1}')",
                    )),
                }
            }
            "split" => {
                self.arity(c, n, 2, 2)?;
                let s = self.str_arg(c, &v, 0)?;
                let delims: Vec<&str> = match &v[1] {
                    JV::String(d) => vec![d.as_str()],
                    JV::Array(a) => {
                        let mut out = Vec::new();
                        for d in a {
                            match d {
                                JV::String(d) => out.push(d.as_str()),
                                other => {
                                    return Err(self.type_err(
                                        c,
                                        1,
                                        "a string or an array of strings",
                                        other,
                                    ))
                                }
                            }
                        }
                        out
                    }
                    other => {
                        return Err(self.type_err(c, 1, "a string or an array of strings", other))
                    }
                };
                self.tick(
                    (s.len() as u64).saturating_mul(delims.len() as u64) / 16,
                    c.span,
                )?;
                Ok(JV::Array(
                    split_any(s, &delims).into_iter().map(JV::String).collect(),
                ))
            }
            "trim" => {
                self.arity(c, n, 1, 1)?;
                Ok(JV::String(self.str_arg(c, &v, 0)?.trim().to_string()))
            }
            "first" | "last" => {
                self.arity(c, n, 1, 1)?;
                match v.into_iter().next() {
                    Some(JV::Array(mut a)) => Ok(if lname == "first" {
                        if a.is_empty() {
                            JV::Null
                        } else {
                            a.swap_remove(0)
                        }
                    } else {
                        a.pop().unwrap_or(JV::Null)
                    }),
                    Some(JV::String(s)) => {
                        let ch = if lname == "first" {
                            s.chars().next()
                        } else {
                            s.chars().last()
                        };
                        Ok(JV::String(ch.map(String::from).unwrap_or_default()))
                    }
                    Some(other) => Err(self.type_err(c, 0, "an array or a string", &other)),
                    None => Err(Failed),
                }
            }
            "contains" => {
                self.arity(c, n, 2, 2)?;
                match &v[0] {
                    JV::String(s) => match &v[1] {
                        JV::Array(_) | JV::Object(_) => Err(self.type_err(c, 1, "a string", &v[1])),
                        item => Ok(JV::Bool(s.contains(text_of(item).as_str()))),
                    },
                    JV::Array(a) => Ok(JV::Bool(a.iter().any(|x| jv_eq(x, &v[1])))),
                    JV::Object(m) => match &v[1] {
                        JV::String(k) => Ok(JV::Bool(m.keys().any(|x| x.eq_ignore_ascii_case(k)))),
                        other => Err(self.type_err(c, 1, "a string key", other)),
                    },
                    other => Err(self.type_err(c, 0, "a string, array or object", other)),
                }
            }
            "startswith" | "endswith" | "indexof" | "lastindexof" => {
                self.arity(c, n, 2, 2)?;
                let s = self.str_arg(c, &v, 0)?.to_lowercase();
                let needle = self.str_arg(c, &v, 1)?.to_lowercase();
                Ok(match lname {
                    "startswith" => JV::Bool(s.starts_with(&needle)),
                    "endswith" => JV::Bool(s.ends_with(&needle)),
                    "indexof" => JV::from(
                        s.find(&needle)
                            .map_or(-1, |b| s[..b].chars().count() as i64),
                    ),
                    _ => JV::from(
                        s.rfind(&needle)
                            .map_or(-1, |b| s[..b].chars().count() as i64),
                    ),
                })
            }
            "union" | "intersection" => {
                self.arity(c, n, 2, usize::MAX)?;
                if v.iter().all(JV::is_object) {
                    let mut it = v.into_iter();
                    let mut acc = it.next().unwrap_or(JV::Null);
                    for o in it {
                        acc = if lname == "union" {
                            merge_objects(acc, o)
                        } else {
                            intersect_objects(acc, o)
                        };
                    }
                    Ok(acc)
                } else if v.iter().all(JV::is_array) {
                    let mut it = v.into_iter();
                    let first = match it.next() {
                        Some(JV::Array(a)) => a,
                        _ => Vec::new(),
                    };
                    let mut acc: Vec<JV> = Vec::new();
                    self.tick(
                        (first.len() as u64).saturating_mul(first.len() as u64) / 16,
                        c.span,
                    )?;
                    for x in first {
                        if !acc.iter().any(|y| jv_eq(y, &x)) {
                            acc.push(x);
                        }
                    }
                    for a in it {
                        let JV::Array(a) = a else { continue };
                        self.tick(
                            (acc.len() as u64 + a.len() as u64).saturating_mul(a.len() as u64) / 16,
                            c.span,
                        )?;
                        if lname == "union" {
                            for x in a {
                                if !acc.iter().any(|y| jv_eq(y, &x)) {
                                    acc.push(x);
                                }
                            }
                        } else {
                            acc.retain(|x| a.iter().any(|y| jv_eq(x, y)));
                        }
                    }
                    Ok(JV::Array(acc))
                } else {
                    let i = if v[0].is_object() || v[0].is_array() {
                        v.iter().position(|x| kind(x) != kind(&v[0])).unwrap_or(0)
                    } else {
                        0
                    };
                    Err(self.type_err(c, i, "all arrays or all objects", &v[i]))
                }
            }
            "take" | "skip" => {
                self.arity(c, n, 2, 2)?;
                let count = self.int_arg(c, &v, 1)?.max(0) as usize;
                match v.into_iter().next() {
                    Some(JV::Array(a)) => Ok(JV::Array(if lname == "take" {
                        a.into_iter().take(count).collect()
                    } else {
                        a.into_iter().skip(count).collect()
                    })),
                    Some(JV::String(s)) => Ok(JV::String(if lname == "take" {
                        s.chars().take(count).collect()
                    } else {
                        s.chars().skip(count).collect()
                    })),
                    Some(other) => Err(self.type_err(c, 0, "an array or a string", &other)),
                    None => Err(Failed),
                }
            }
            "join" => {
                self.arity(c, n, 2, 2)?;
                let delim = self.str_arg(c, &v, 1)?.to_string();
                let JV::Array(a) = &v[0] else {
                    return Err(self.type_err(c, 0, "an array", &v[0]));
                };
                let mut parts = Vec::new();
                for x in a {
                    match x {
                        JV::Array(_) | JV::Object(_) => {
                            return Err(self.type_err(
                                c,
                                0,
                                "an array of strings, integers or booleans",
                                x,
                            ))
                        }
                        other => parts.push(text_of(other)),
                    }
                }
                let out = parts.join(&delim);
                self.too_long(c, out.len())?;
                Ok(JV::String(out))
            }
            "array" => {
                self.arity(c, n, 1, 1)?;
                Ok(match v.into_iter().next() {
                    Some(JV::Array(a)) => JV::Array(a),
                    Some(x) => JV::Array(vec![x]),
                    None => JV::Array(Vec::new()),
                })
            }
            "range" => {
                self.arity(c, n, 2, 2)?;
                let start = self.int_arg(c, &v, 0)?;
                let count = self.int_arg(c, &v, 1)?;
                if !(0..=MAX_RANGE).contains(&count)
                    || start.saturating_add(count) > i32::MAX as i64
                    || start < i32::MIN as i64
                {
                    return Err(self.fail(c.span, format!("range(): count must be from 0 to {MAX_RANGE} and start + count at most 2147483647, got start {start}, count {count}"), "use a smaller range"));
                }
                Ok(JV::Array((start..start + count).map(JV::from).collect()))
            }
            "min" | "max" => {
                self.arity(c, n, 1, usize::MAX)?;
                let items: Vec<JV> = if n == 1 && v[0].is_array() {
                    v[0].as_array().cloned().unwrap_or_default()
                } else {
                    v
                };
                let mut best: Option<i64> = None;
                for (i, x) in items.iter().enumerate() {
                    let Some(k) = as_int(x) else {
                        return Err(self.type_err(
                            c,
                            i.min(n - 1),
                            "integers (or one array of integers)",
                            x,
                        ));
                    };
                    best = Some(match best {
                        None => k,
                        Some(b) if lname == "min" => b.min(k),
                        Some(b) => b.max(k),
                    });
                }
                match best {
                    Some(b) => Ok(JV::from(b)),
                    None => Err(self.fail(
                        c.span,
                        format!("{}() of an empty array", c.name),
                        "pass at least one integer",
                    )),
                }
            }
            "add" | "sub" | "mul" | "div" | "mod" => {
                self.arity(c, n, 2, 2)?;
                let a = self.int_arg(c, &v, 0)?;
                let b = self.int_arg(c, &v, 1)?;
                if (lname == "div" || lname == "mod") && b == 0 {
                    return Err(self.fail(
                        c.arg(1),
                        format!("{}(): division by zero", c.name),
                        "divide by a non-zero integer",
                    ));
                }
                let r = match lname {
                    "add" => a.checked_add(b),
                    "sub" => a.checked_sub(b),
                    "mul" => a.checked_mul(b),
                    "div" => a.checked_div(b),
                    _ => a.checked_rem(b),
                };
                match r {
                    Some(r) => Ok(JV::from(r)),
                    None => Err(self.fail(
                        c.span,
                        format!("{}(): integer overflow", c.name),
                        "use smaller numbers",
                    )),
                }
            }
            "padleft" => {
                self.arity(c, n, 2, 3)?;
                let s = match &v[0] {
                    JV::String(s) => s.clone(),
                    JV::Number(_) => text_of(&v[0]),
                    other => return Err(self.type_err(c, 0, "a string or an integer", other)),
                };
                let total = self.int_arg(c, &v, 1)?;
                let pad = if n > 2 {
                    self.str_arg(c, &v, 2)?.to_string()
                } else {
                    " ".to_string()
                };
                let mut pc = pad.chars();
                let (Some(p), None) = (pc.next(), pc.next()) else {
                    return Err(self.fail(
                        c.arg(2),
                        "padLeft(): the padding must be a single character",
                        "pass one character, like '0'",
                    ));
                };
                let have = s.chars().count() as i64;
                if total > have {
                    self.too_long(c, s.len() + (total - have) as usize * p.len_utf8())?;
                    let mut out: String = std::iter::repeat_n(p, (total - have) as usize).collect();
                    out.push_str(&s);
                    return Ok(JV::String(out));
                }
                Ok(JV::String(s))
            }
            "base64" => {
                self.arity(c, n, 1, 1)?;
                Ok(JV::String(base64_encode(
                    self.str_arg(c, &v, 0)?.as_bytes(),
                )))
            }
            "base64tostring" | "base64tojson" => {
                self.arity(c, n, 1, 1)?;
                let s = self.str_arg(c, &v, 0)?;
                let text = base64_decode(s).and_then(|b| String::from_utf8(b).ok());
                let Some(text) = text else {
                    return Err(self.fail(
                        c.arg(0),
                        format!("{}(): the text is not valid base64 of UTF-8 text", c.name),
                        "pass base64 text",
                    ));
                };
                if lname == "base64tostring" {
                    return Ok(JV::String(text));
                }
                match serde_json::from_str::<JV>(&text) {
                    Ok(j) => Ok(j),
                    Err(e) => Err(self.fail(
                        c.arg(0),
                        format!("base64ToJson(): the decoded text is not JSON ({e})"),
                        "pass the base64 of a JSON text",
                    )),
                }
            }
            "uricomponent" => {
                self.arity(c, n, 1, 1)?;
                Ok(JV::String(uri_escape(self.str_arg(c, &v, 0)?)))
            }
            "uricomponenttostring" => {
                self.arity(c, n, 1, 1)?;
                Ok(JV::String(uri_unescape(self.str_arg(c, &v, 0)?)))
            }
            "uri" => {
                self.arity(c, n, 2, 2)?;
                let base = self.str_arg(c, &v, 0)?;
                let rel = self.str_arg(c, &v, 1)?;
                match uri_combine(base, rel) {
                    Some(u) => Ok(JV::String(u)),
                    None => Err(self.fail(
                        c.arg(0),
                        format!("uri(): '{}' is not an absolute URI", truncate(base, 60)),
                        "pass an absolute base URI like https://host/path/",
                    )),
                }
            }
            "datauri" => {
                self.arity(c, n, 1, 1)?;
                let s = text_of(&v[0]);
                Ok(JV::String(format!(
                    "data:text/plain;charset=utf8;base64,{}",
                    base64_encode(s.as_bytes())
                )))
            }
            "datauritostring" => {
                self.arity(c, n, 1, 1)?;
                let s = self.str_arg(c, &v, 0)?;
                let decoded = s
                    .strip_prefix("data:")
                    .and_then(|rest| rest.split_once(','))
                    .and_then(|(meta, data)| {
                        if meta.ends_with(";base64") {
                            base64_decode(data).and_then(|b| String::from_utf8(b).ok())
                        } else {
                            Some(uri_unescape(data))
                        }
                    });
                match decoded {
                    Some(d) => Ok(JV::String(d)),
                    None => Err(self.fail(
                        c.arg(0),
                        "dataUriToString(): not a data URI",
                        "pass a value like data:text/plain;charset=utf8;base64,SGVsbG8=",
                    )),
                }
            }
            "items" | "objectkeys" => {
                self.arity(c, n, 1, 1)?;
                let JV::Object(m) = &v[0] else {
                    return Err(self.type_err(c, 0, "an object", &v[0]));
                };
                let mut entries: Vec<(&String, &JV)> = m.iter().collect();
                if lname == "items" {
                    entries.sort_by(|a, b| {
                        a.0.to_lowercase()
                            .cmp(&b.0.to_lowercase())
                            .then(a.0.cmp(b.0))
                    });
                    Ok(JV::Array(
                        entries
                            .into_iter()
                            .map(|(k, val)| {
                                let mut o = Map::new();
                                o.insert("key".into(), JV::String(k.clone()));
                                o.insert("value".into(), val.clone());
                                JV::Object(o)
                            })
                            .collect(),
                    ))
                } else {
                    Ok(JV::Array(
                        entries
                            .into_iter()
                            .map(|(k, _)| JV::String(k.clone()))
                            .collect(),
                    ))
                }
            }
            "resourcegroup" => {
                self.arity(c, n, 0, 0)?;
                let ctx = &self.scopes[f.scope].ctx;
                if !ctx.rg_scope {
                    return Err(self.fail(
                        c.name_span,
                        "resourceGroup() is not available in a subscription-, management-group- or tenant-scoped template",
                        "use a nested deployment with \"resourceGroup\" set, or pass the value as a parameter",
                    ));
                }
                let mut o = Map::new();
                o.insert(
                    "id".into(),
                    JV::String(format!(
                        "/subscriptions/{}/resourceGroups/{}",
                        ctx.sub, ctx.rg
                    )),
                );
                o.insert("name".into(), JV::String(ctx.rg.clone()));
                o.insert(
                    "type".into(),
                    JV::String("Microsoft.Resources/resourceGroups".into()),
                );
                o.insert("location".into(), JV::String(ctx.loc.clone()));
                o.insert("tags".into(), JV::Object(Map::new()));
                let mut p = Map::new();
                p.insert("provisioningState".into(), JV::String("Succeeded".into()));
                o.insert("properties".into(), JV::Object(p));
                Ok(JV::Object(o))
            }
            "subscription" => {
                self.arity(c, n, 0, 0)?;
                let ctx = &self.scopes[f.scope].ctx;
                let mut o = Map::new();
                o.insert(
                    "id".into(),
                    JV::String(format!("/subscriptions/{}", ctx.sub)),
                );
                o.insert("subscriptionId".into(), JV::String(ctx.sub.clone()));
                o.insert("tenantId".into(), JV::String(ctx.tenant.clone()));
                o.insert("displayName".into(), JV::String(ctx.sub.clone()));
                Ok(JV::Object(o))
            }
            "tenant" => {
                self.arity(c, n, 0, 0)?;
                let ctx = &self.scopes[f.scope].ctx;
                let mut o = Map::new();
                o.insert("tenantId".into(), JV::String(ctx.tenant.clone()));
                o.insert("displayName".into(), JV::String(ctx.tenant.clone()));
                Ok(JV::Object(o))
            }
            "deployment" => {
                self.arity(c, n, 0, 0)?;
                let ctx = &self.scopes[f.scope].ctx;
                let props = serde_json_object(&[
                    (
                        "template",
                        serde_json_object(&[(
                            "contentVersion",
                            JV::String(ctx.content_version.clone()),
                        )]),
                    ),
                    ("parameters", JV::Object(Map::new())),
                    ("mode", JV::String("Incremental".into())),
                    ("provisioningState", JV::String("Accepted".into())),
                ]);
                let mut members = vec![
                    ("name", JV::String(ctx.deployment.clone())),
                    ("properties", props),
                ];
                if !ctx.rg_scope {
                    members.push(("location", JV::String(ctx.loc.clone())));
                }
                Ok(serde_json_object(&members))
            }
            "environment" => {
                self.arity(c, n, 0, 0)?;
                Ok(azure_cloud())
            }
            "resourceid"
            | "subscriptionresourceid"
            | "tenantresourceid"
            | "extensionresourceid" => self.resource_id(lname, c, &v, f),
            "uniquestring" | "guid" => {
                self.arity(c, n, 1, usize::MAX)?;
                let mut parts = Vec::new();
                for i in 0..n {
                    parts.push(self.str_arg(c, &v, i)?);
                }
                let joined = parts.join("-");
                Ok(JV::String(if lname == "guid" {
                    uuid_v5(&ARM_GUID_NAMESPACE, joined.as_bytes())
                } else {
                    unique_string(&joined)
                }))
            }
            "utcnow" | "newguid" => {
                if !f.in_param_default {
                    return Err(self.fail(
                        c.name_span,
                        format!("{}() can only be used in a parameter's defaultValue", c.name),
                        "declare a parameter whose defaultValue uses it, and use parameters('...') here",
                    ));
                }
                if lname == "newguid" {
                    self.arity(c, n, 0, 0)?;
                    return Ok(JV::String(new_guid()));
                }
                self.arity(c, n, 0, 1)?;
                let fmt = if n == 1 {
                    self.str_arg(c, &v, 0)?.to_string()
                } else {
                    "yyyyMMddTHHmmssZ".to_string()
                };
                Ok(JV::String(format_utc(&fmt, &now_utc())))
            }
            _ => Err(self.fail(
                c.name_span,
                format!("{}() is listed as supported but not implemented", c.name),
                "report this kiln bug",
            )),
        }
    }

    fn resource_id(&mut self, lname: &str, c: &Site, v: &[JV], f: &Frame) -> R<JV> {
        let n = v.len();
        let mut parts = Vec::new();
        for i in 0..n {
            parts.push(self.str_arg(c, v, i)?.to_string());
        }
        let ctx = self.scopes[f.scope].ctx.clone();
        // The resource type is the first argument of the form Namespace/type (after the
        // optional scope arguments).
        let (skip, min_pre, max_pre) = match lname {
            "extensionresourceid" => (1, 0, 0),
            "resourceid" => (0, 0, 2),
            "subscriptionresourceid" => (0, 0, 1),
            _ => (0, 0, 0),
        };
        self.arity(c, n, skip + 2, usize::MAX)?;
        let Some(t) = parts
            .iter()
            .enumerate()
            .skip(skip)
            .position(|(_, p)| p.contains('/'))
            .map(|i| i + skip)
        else {
            return Err(self.fail(c.span, format!("{}(): no resource type argument (like 'Microsoft.Network/virtualNetworks') found", c.name), "pass the resource type before the resource names"));
        };
        let pre = t - skip;
        if pre < min_pre || pre > max_pre {
            return Err(self.fail(
                c.arg(t),
                format!("{}(): the resource type must be argument {} (after at most {max_pre} scope argument{}), found it at argument {}", c.name, skip + max_pre + 1, if max_pre == 1 { "" } else { "s" }, t + 1),
                "check the argument order: [subscriptionId], [resourceGroupName], resourceType, name1, name2...",
            ));
        }
        let ty = &parts[t];
        let mut segs = ty.split('/');
        let ns = segs.next().unwrap_or("");
        let types: Vec<&str> = segs.collect();
        let mut names: Vec<String> = parts[t + 1..].to_vec();
        if names.len() != types.len() {
            let split: Vec<String> = names.join("/").split('/').map(str::to_string).collect();
            if split.len() == types.len() {
                names = split;
            } else {
                return Err(self.fail(
                    c.span,
                    format!(
                        "{}(): resource type '{ty}' needs {} name{}, got {}",
                        c.name,
                        types.len(),
                        if types.len() == 1 { "" } else { "s" },
                        names.len()
                    ),
                    "pass one name per type segment after the namespace",
                ));
            }
        }
        let mut tail = format!("providers/{ns}");
        for (ty, name) in types.iter().zip(&names) {
            tail.push('/');
            tail.push_str(ty);
            tail.push('/');
            tail.push_str(name);
        }
        let id = match lname {
            "resourceid" => {
                let (sub, rg) = match pre {
                    2 => (parts[0].clone(), Some(parts[1].clone())),
                    1 => (ctx.sub.clone(), Some(parts[0].clone())),
                    _ => (
                        ctx.sub.clone(),
                        if ctx.rg_scope {
                            Some(ctx.rg.clone())
                        } else {
                            None
                        },
                    ),
                };
                match rg {
                    Some(rg) => format!("/subscriptions/{sub}/resourceGroups/{rg}/{tail}"),
                    None => format!("/subscriptions/{sub}/{tail}"),
                }
            }
            "subscriptionresourceid" => {
                let sub = if pre == 1 {
                    parts[0].clone()
                } else {
                    ctx.sub.clone()
                };
                format!("/subscriptions/{sub}/{tail}")
            }
            "extensionresourceid" => format!("{}/{tail}", parts[0].trim_end_matches('/')),
            _ => format!("/{tail}"),
        };
        Ok(JV::String(id))
    }
}

fn serde_json_object(members: &[(&str, JV)]) -> JV {
    let mut o = Map::new();
    for (k, v) in members {
        o.insert((*k).to_string(), v.clone());
    }
    JV::Object(o)
}

/// `environment()` for the public Azure cloud.
fn azure_cloud() -> JV {
    let s = |x: &str| JV::String(x.to_string());
    serde_json_object(&[
        ("name", s("AzureCloud")),
        ("gallery", s("https://gallery.azure.com/")),
        ("graph", s("https://graph.windows.net/")),
        ("portal", s("https://portal.azure.com")),
        ("graphAudience", s("https://graph.windows.net/")),
        ("activeDirectoryDataLake", s("https://datalake.azure.net/")),
        ("batch", s("https://batch.core.windows.net/")),
        ("media", s("https://rest.media.azure.net")),
        ("sqlManagement", s("https://management.core.windows.net:8443/")),
        ("vmImageAliasDoc", s("https://raw.githubusercontent.com/Azure/azure-rest-api-specs/master/arm-compute/quickstart-templates/aliases.json")),
        ("resourceManager", s("https://management.azure.com/")),
        (
            "authentication",
            serde_json_object(&[
                ("loginEndpoint", s("https://login.microsoftonline.com/")),
                ("audiences", JV::Array(vec![s("https://management.core.windows.net/"), s("https://management.azure.com/")])),
                ("tenant", s("common")),
                ("identityProvider", s("AAD")),
            ]),
        ),
        (
            "suffixes",
            serde_json_object(&[
                ("acrLoginServer", s(".azurecr.io")),
                ("azureDatalakeAnalyticsCatalogAndJob", s("azuredatalakeanalytics.net")),
                ("azureDatalakeStoreFileSystem", s("azuredatalakestore.net")),
                ("azureFrontDoorEndpointSuffix", s("azurefd.net")),
                ("keyvaultDns", s(".vault.azure.net")),
                ("sqlServerHostname", s(".database.windows.net")),
                ("storage", s("core.windows.net")),
            ]),
        ),
    ])
}

/// `union` of objects: later values win; nested objects are merged recursively.
fn merge_objects(a: JV, b: JV) -> JV {
    match (a, b) {
        (JV::Object(mut a), JV::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(old) if old.is_object() && v.is_object() => {
                        let o = std::mem::take(old);
                        *old = merge_objects(o, v);
                    }
                    Some(old) => *old = v,
                    None => {
                        a.insert(k, v);
                    }
                }
            }
            JV::Object(a)
        }
        (_, b) => b,
    }
}

fn intersect_objects(a: JV, b: JV) -> JV {
    match (a, b) {
        (JV::Object(a), JV::Object(b)) => JV::Object(
            a.into_iter()
                .filter(|(k, v)| b.get(k).is_some_and(|w| jv_eq(v, w)))
                .collect(),
        ),
        _ => JV::Object(Map::new()),
    }
}

/// .NET `String.Split(string[] separators)`: at each position the first separator (in list
/// order) that matches splits; empty separators are ignored.
fn split_any(s: &str, delims: &[&str]) -> Vec<String> {
    let delims: Vec<&str> = delims.iter().copied().filter(|d| !d.is_empty()).collect();
    if delims.is_empty() {
        return vec![s.to_string()];
    }
    let mut out = Vec::new();
    let mut cur = 0;
    let mut i = 0;
    while i < s.len() {
        if let Some(d) = delims.iter().find(|d| s[i..].starts_with(**d)) {
            out.push(s[cur..i].to_string());
            i += d.len();
            cur = i;
        } else {
            i += s[i..].chars().next().map_or(1, char::len_utf8);
        }
    }
    out.push(s[cur..].to_string());
    out
}

// ---------------------------------------------------------------------------------------------
// .NET composite formatting (format())
// ---------------------------------------------------------------------------------------------

/// `String.Format` semantics: `{index[,alignment][:formatString]}`, `{{` and `}}` for braces.
/// Numeric format strings `N`, `D`, `F`, `X`, `P`, `G` and zero-padding patterns (`000`) are
/// honoured; other format strings print the value plainly.
fn dotnet_format(fmt: &str, args: &[JV], max: usize) -> Result<String, String> {
    let b = fmt.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    let mut lit = 0;
    while i < b.len() {
        match b[i] {
            b'{' if b.get(i + 1) == Some(&b'{') => {
                out.push_str(&fmt[lit..=i]);
                i += 2;
                lit = i;
            }
            b'{' => {
                out.push_str(&fmt[lit..i]);
                let close = fmt[i..].find('}').map(|c| c + i).ok_or_else(|| format!("unclosed `{{` at position {i} of the format string"))?;
                let inner = &fmt[i + 1..close];
                let (head, spec) = match inner.find(':') {
                    Some(c) => (&inner[..c], Some(&inner[c + 1..])),
                    None => (inner, None),
                };
                let (idx, align) = match head.find(',') {
                    Some(c) => (&head[..c], Some(head[c + 1..].trim())),
                    None => (head, None),
                };
                let idx: usize = idx.trim().parse().map_err(|_| format!("`{{{inner}}}` is not a valid placeholder"))?;
                let arg = args.get(idx).ok_or_else(|| {
                    format!("placeholder {{{idx}}} refers to argument {idx}, but only {} argument{} follow the format string", args.len(), if args.len() == 1 { "" } else { "s" })
                })?;
                let mut text = format_arg(arg, spec.unwrap_or(""));
                if let Some(a) = align {
                    let w: i64 = a.parse().map_err(|_| format!("`{a}` is not a valid alignment in `{{{inner}}}`"))?;
                    let width = w.unsigned_abs().min(max as u64) as usize;
                    let have = text.chars().count();
                    if have < width {
                        let pad = " ".repeat(width - have);
                        text = if w > 0 { pad + &text } else { text + &pad };
                    }
                }
                out.push_str(&text);
                if out.len() > max {
                    return Err(format!("the result is longer than {} MiB", max >> 20));
                }
                i = close + 1;
                lit = i;
            }
            b'}' if b.get(i + 1) == Some(&b'}') => {
                out.push_str(&fmt[lit..=i]);
                i += 2;
                lit = i;
            }
            b'}' => return Err(format!("unmatched `}}` at position {i} of the format string (write `}}}}` for a literal brace)")),
            _ => i += 1,
        }
    }
    out.push_str(&fmt[lit..]);
    if out.len() > max {
        return Err(format!("the result is longer than {} MiB", max >> 20));
    }
    Ok(out)
}

fn group_thousands(digits: &str) -> String {
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        match (digits.len() - i) % 3 {
            0 if i > 0 => out.push(','),
            _ => {}
        }
        out.push(ch);
    }
    out
}

fn format_arg(v: &JV, spec: &str) -> String {
    let JV::Number(num) = v else {
        return text_of(v);
    };
    let spec = spec.trim();
    if spec.is_empty() {
        return text_of(v);
    }
    let letter = spec.as_bytes()[0];
    // (the first byte is ASCII whenever `spec[1..]` is sliced)
    let prec: Option<usize> = if letter.is_ascii_alphabetic() && spec.len() > 1 {
        spec[1..].parse().ok().map(|p: usize| p.min(50))
    } else {
        None
    };
    if !letter.is_ascii_alphabetic() || (spec.len() > 1 && prec.is_none()) {
        // custom pattern: zero padding like "000" or "#,##0" is common enough to honour
        if spec.bytes().all(|c| c == b'0' || c == b'#') {
            if let Some(i) = num.as_i64() {
                let zeros = spec.bytes().filter(|&c| c == b'0').count();
                return if i < 0 {
                    format!("-{:0zeros$}", i.unsigned_abs())
                } else {
                    format!("{i:0zeros$}")
                };
            }
        }
        return text_of(v);
    }
    let f = num.as_f64().unwrap_or(0.0);
    let int = num.as_i64();
    match letter.to_ascii_uppercase() {
        b'N' | b'F' => {
            let p = prec.unwrap_or(2);
            let s = match int {
                Some(i) if p == 0 => i.unsigned_abs().to_string(),
                Some(i) => format!("{}.{}", i.unsigned_abs(), "0".repeat(p)),
                None => format!("{:.p$}", f.abs()),
            };
            let neg = int.map_or(f < 0.0, |i| i < 0);
            let s = if letter.eq_ignore_ascii_case(&b'N') {
                let (whole, frac) = s
                    .split_once('.')
                    .map_or((s.as_str(), None), |(w, fr)| (w, Some(fr)));
                match frac {
                    Some(fr) => format!("{}.{fr}", group_thousands(whole)),
                    None => group_thousands(whole),
                }
            } else {
                s
            };
            if neg {
                format!("-{s}")
            } else {
                s
            }
        }
        b'D' => match int {
            Some(i) => {
                let p = prec.unwrap_or(0);
                if i < 0 {
                    format!("-{:0p$}", i.unsigned_abs())
                } else {
                    format!("{i:0p$}")
                }
            }
            None => text_of(v),
        },
        b'X' => match int {
            Some(i) => {
                let p = prec.unwrap_or(0);
                if letter == b'x' {
                    format!("{i:0p$x}")
                } else {
                    format!("{i:0p$X}")
                }
            }
            None => text_of(v),
        },
        b'P' => {
            let p = prec.unwrap_or(2);
            format!("{:.p$} %", f * 100.0)
        }
        _ => text_of(v),
    }
}

// ---------------------------------------------------------------------------------------------
// Encodings
// ---------------------------------------------------------------------------------------------

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk.len();
        let b = [
            chunk[0],
            if n > 1 { chunk[1] } else { 0 },
            if n > 2 { chunk[2] } else { 0 },
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= n {
                out.push(B64[((v >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim().trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = B64.iter().position(|&x| x == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// .NET `Uri.EscapeDataString`: everything but RFC 3986 unreserved characters is %-encoded.
fn uri_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn uri_unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && b[i + 1].is_ascii_hexdigit()
            && b[i + 2].is_ascii_hexdigit()
        {
            let hex = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
            out.push(hex(b[i + 1]) * 16 + hex(b[i + 2]));
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `uri(base, relative)`: RFC 3986 reference resolution without dot-segment removal.
fn uri_combine(base: &str, rel: &str) -> Option<String> {
    if let Some(p) = rel.find("://") {
        if p > 0
            && rel[..p]
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'))
        {
            return Some(rel.to_string());
        }
    }
    let scheme_end = base.find("://")?;
    if scheme_end == 0 {
        return None;
    }
    let auth_start = scheme_end + 3;
    let path_start = base[auth_start..]
        .find(['/', '?', '#'])
        .map_or(base.len(), |i| auth_start + i);
    let authority = &base[..path_start];
    let rest = &base[path_start..];
    let path = &rest[..rest.find(['?', '#']).unwrap_or(rest.len())];
    if rel.is_empty() {
        return Some(base.to_string());
    }
    if let Some(r) = rel.strip_prefix("//") {
        return Some(format!("{}//{r}", &base[..=scheme_end]));
    }
    if rel.starts_with('/') {
        return Some(format!("{authority}{rel}"));
    }
    if rel.starts_with('?') || rel.starts_with('#') {
        return Some(format!("{authority}{path}{rel}"));
    }
    let dir = match path.rfind('/') {
        Some(i) => &path[..=i],
        None => "/",
    };
    Some(format!("{authority}{dir}{rel}"))
}

// ---------------------------------------------------------------------------------------------
// uniqueString, guid, newGuid
// ---------------------------------------------------------------------------------------------

/// ARM's `uniqueString`: the 64-bit MurmurHash variant of Azure's resource stack over the UTF-8
/// bytes, the top 65 bits rendered as 13 characters of lower-case base32.
fn unique_string(s: &str) -> String {
    let mut h = murmur64(s.as_bytes());
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::with_capacity(13);
    for _ in 0..13 {
        out.push(ALPHABET[(h >> 59) as usize] as char);
        h <<= 5;
    }
    out
}

fn murmur64(data: &[u8]) -> u64 {
    const C1: u32 = 0x239b_961b;
    const C2: u32 = 0xab0e_9789;
    const C3: u32 = 0x561c_cd1b;
    const C4: u32 = 0x0bca_a747;
    const C5: u32 = 0x85eb_ca6b;
    const C6: u32 = 0xc2b2_ae35;
    let le = |b: &[u8]| {
        b.iter()
            .rev()
            .fold(0u32, |acc, &x| (acc << 8) | u32::from(x))
    };
    let len = data.len();
    let (mut h1, mut h2) = (0u32, 0u32);
    let mut i = 0;
    while i + 8 <= len {
        let k1 = le(&data[i..i + 4])
            .wrapping_mul(C1)
            .rotate_left(15)
            .wrapping_mul(C2);
        h1 = (h1 ^ k1)
            .rotate_left(19)
            .wrapping_add(h2)
            .wrapping_mul(5)
            .wrapping_add(C3);
        let k2 = le(&data[i + 4..i + 8])
            .wrapping_mul(C2)
            .rotate_left(17)
            .wrapping_mul(C1);
        h2 = (h2 ^ k2)
            .rotate_left(13)
            .wrapping_add(h1)
            .wrapping_mul(5)
            .wrapping_add(C4);
        i += 8;
    }
    let tail = len - i;
    if tail > 0 {
        let k1 = le(&data[i..i + tail.min(4)])
            .wrapping_mul(C1)
            .rotate_left(15)
            .wrapping_mul(C2);
        h1 ^= k1;
        if tail > 4 {
            let k2 = le(&data[i + 4..len])
                .wrapping_mul(C2)
                .rotate_left(17)
                .wrapping_mul(C1);
            h2 ^= k2;
        }
    }
    h1 ^= len as u32;
    h2 ^= len as u32;
    h1 = h1.wrapping_add(h2);
    h2 = h2.wrapping_add(h1);
    let fmix = |mut h: u32| {
        h ^= h >> 16;
        h = h.wrapping_mul(C5);
        h ^= h >> 13;
        h = h.wrapping_mul(C6);
        h ^ (h >> 16)
    };
    h1 = fmix(h1);
    h2 = fmix(h2);
    h1 = h1.wrapping_add(h2);
    h2 = h2.wrapping_add(h1);
    (u64::from(h2) << 32) | u64::from(h1)
}

/// The namespace of ARM's `guid()` (a name-based UUID, version 5).
const ARM_GUID_NAMESPACE: [u8; 16] = [
    0x11, 0xfb, 0x06, 0xfb, 0x71, 0x2d, 0x4d, 0xdd, 0x98, 0xc7, 0xe7, 0x1b, 0xbd, 0x58, 0x88, 0x30,
];

fn uuid_v5(namespace: &[u8; 16], name: &[u8]) -> String {
    let mut data = namespace.to_vec();
    data.extend_from_slice(name);
    let h = sha1(&data);
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    fmt_uuid(&b)
}

fn fmt_uuid(b: &[u8; 16]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for chunk in msg.chunks(64) {
        let mut w = [0u32; 80];
        for t in 0..16 {
            w[t] = u32::from_be_bytes([
                chunk[4 * t],
                chunk[4 * t + 1],
                chunk[4 * t + 2],
                chunk[4 * t + 3],
            ]);
        }
        for t in 16..80 {
            w[t] = (w[t - 3] ^ w[t - 8] ^ w[t - 14] ^ w[t - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (t, wt) in w.iter().enumerate() {
            let (f, k) = match t {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let temp = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wt);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = temp;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, x) in h.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

/// A random (version 4) UUID from the standard library's randomly keyed hasher.
fn new_guid() -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut b = [0u8; 16];
    for (i, chunk) in b.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(nanos);
        h.write_usize(i);
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    fmt_uuid(&b)
}

// ---------------------------------------------------------------------------------------------
// utcNow
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Utc {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    nanos: u32,
    /// 0 = Sunday.
    weekday: u32,
}

fn now_utc() -> Utc {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    utc_from_unix(d.as_secs() as i64, d.subsec_nanos())
}

fn utc_from_unix(secs: i64, nanos: u32) -> Utc {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400) as u32;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    Utc {
        year,
        month,
        day,
        hour: rem / 3600,
        minute: rem / 60 % 60,
        second: rem % 60,
        nanos,
        weekday: (days + 4).rem_euclid(7) as u32,
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// .NET date formatting (invariant culture) of a UTC time: the standard one-letter formats and
/// custom patterns (`yyyy`, `MM`, `dd`, `HH`, `hh`, `mm`, `ss`, `fff`, `tt`, `'literal'`, ...).
fn format_utc(fmt: &str, t: &Utc) -> String {
    let pattern = match fmt {
        "d" => "MM/dd/yyyy",
        "D" => "dddd, dd MMMM yyyy",
        "f" => "dddd, dd MMMM yyyy HH:mm",
        "F" => "dddd, dd MMMM yyyy HH:mm:ss",
        "g" => "MM/dd/yyyy HH:mm",
        "G" => "MM/dd/yyyy HH:mm:ss",
        "m" | "M" => "MMMM dd",
        "o" | "O" => "yyyy'-'MM'-'dd'T'HH':'mm':'ss'.'fffffffK",
        "r" | "R" => "ddd, dd MMM yyyy HH':'mm':'ss 'GMT'",
        "s" => "yyyy'-'MM'-'dd'T'HH':'mm':'ss",
        "t" => "HH:mm",
        "T" => "HH:mm:ss",
        "u" => "yyyy'-'MM'-'dd HH':'mm':'ss'Z'",
        "U" => "dddd, dd MMMM yyyy HH:mm:ss",
        "y" | "Y" => "yyyy MMMM",
        other => other,
    };
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let ch = chars[i];
        let mut run = 1;
        while i + run < chars.len() && chars[i + run] == ch {
            run += 1;
        }
        let h12 = match t.hour % 12 {
            0 => 12,
            h => h,
        };
        let num = |v: i64, width: usize| format!("{v:0width$}");
        match ch {
            'y' => out.push_str(&match run {
                1 => (t.year % 100).to_string(),
                2 => num(t.year % 100, 2),
                n => num(t.year, n),
            }),
            'M' => out.push_str(&match run {
                1 => t.month.to_string(),
                2 => num(i64::from(t.month), 2),
                3 => MONTHS[(t.month - 1) as usize][..3].to_string(),
                _ => MONTHS[(t.month - 1) as usize].to_string(),
            }),
            'd' => out.push_str(&match run {
                1 => t.day.to_string(),
                2 => num(i64::from(t.day), 2),
                3 => DAYS[t.weekday as usize][..3].to_string(),
                _ => DAYS[t.weekday as usize].to_string(),
            }),
            'H' | 'h' | 'm' | 's' => {
                let v = match ch {
                    'H' => t.hour,
                    'h' => h12,
                    'm' => t.minute,
                    _ => t.second,
                };
                out.push_str(&if run == 1 {
                    v.to_string()
                } else {
                    num(i64::from(v), 2)
                });
            }
            'f' | 'F' => {
                let digits = format!("{:09}", t.nanos);
                let n = run.min(7);
                let mut frac = digits[..n].to_string();
                if ch == 'F' {
                    frac = frac.trim_end_matches('0').to_string();
                }
                out.push_str(&frac);
            }
            't' => {
                let am = t.hour < 12;
                out.push_str(match (run, am) {
                    (1, true) => "A",
                    (1, false) => "P",
                    (_, true) => "AM",
                    (_, false) => "PM",
                });
            }
            'K' => out.push('Z'),
            'z' => out.push_str(match run {
                1 => "+0",
                2 => "+00",
                _ => "+00:00",
            }),
            '\'' | '"' => {
                // quoted literal: copy up to the matching quote
                let mut j = i + 1;
                while j < chars.len() && chars[j] != ch {
                    out.push(chars[j]);
                    j += 1;
                }
                i = j + 1;
                continue;
            }
            '\\' => {
                if let Some(&next) = chars.get(i + 1) {
                    out.push(next);
                }
                i += 2;
                continue;
            }
            '%' => {
                i += 1;
                continue;
            }
            _ => {
                for _ in 0..run {
                    out.push(ch);
                }
            }
        }
        i += run;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::parse;
    use serde_json::json;

    fn ctx() -> ArmContext {
        ArmContext {
            subscription_id: "11111111-2222-3333-4444-555555555555".into(),
            resource_group: "rg-build".into(),
            resource_group_location: "westeurope".into(),
            deployment_name: "dep1".into(),
            tenant_id: "99999999-8888-7777-6666-555555555555".into(),
        }
    }

    const SUB: &str = "11111111-2222-3333-4444-555555555555";

    const PARAMS: &str = r#"{
        "name": {"type": "string", "defaultValue": "img"},
        "count": {"type": "int", "defaultValue": 3},
        "flag": {"type": "bool", "defaultValue": true},
        "list": {"type": "array", "defaultValue": ["a", "b", "c"]},
        "obj": {"type": "object", "defaultValue": {"Key": "v", "nested": {"x": 1}}},
        "later": {"type": "string", "defaultValue": "[concat(parameters('name'), '-', string(parameters('count')))]"}
    }"#;
    const VARS: &str = r#"{
        "v1": "[concat(parameters('name'), '-v')]",
        "v2": "[toUpper(variables('v1'))]",
        "arr": [1, 2, 3],
        "o": {"a": "[parameters('count')]", "[concat('k', '1')]": "[[literal]"},
        "bad": "[reference('unrelated').id]"
    }"#;

    fn template_with(expr: &str) -> String {
        let lit = serde_json::to_string(expr).unwrap();
        format!(
            r#"{{"$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#", "contentVersion": "1.0.0.0",
  "parameters": {PARAMS}, "variables": {VARS},
  "resources": [{{"type": "Microsoft.VirtualMachineImages/imageTemplates", "apiVersion": "2022-02-14", "name": "t", "location": "eastus",
    "properties": {{"probe": {lit}}}}}]}}"#
        )
    }

    struct Probe {
        src: String,
        value: Option<JV>,
        diags: Vec<ArmDiag>,
    }

    fn probe(expr: &str) -> Probe {
        let src = template_with(expr);
        let root = parse(&src).unwrap_or_else(|e| panic!("{expr}: {e}")).root;
        let (res, diags) = evaluate_image_templates(&root, &[], &ctx());
        assert_eq!(res.len(), 1, "{expr}: {diags:?}");
        let r = &res[0];
        let v = r
            .node
            .get("properties")
            .and_then(|p| p.get("probe"))
            .expect("probe");
        let value = if r.unresolved.is_empty() {
            Some(v.to_json())
        } else {
            None
        };
        Probe { src, value, diags }
    }

    fn text(src: &str, span: Span) -> &str {
        &src[span.start..span.end]
    }

    #[test]
    fn expressions_evaluate_as_documented() {
        let rg_id = format!("/subscriptions/{SUB}/resourceGroups/rg-build");
        let table: Vec<(&str, JV)> = vec![
            ("plain text", json!("plain text")),
            ("[[notAnExpression]", json!("[notAnExpression]")),
            ("[ concat( 'a' , 'b' ) ]", json!("ab")),
            ("['it''s']", json!("it's")),
            ("[createArray(true, false, null)]", json!([true, false, null])),
            ("[parameters('name')]", json!("img")),
            ("[parameters('NAME')]", json!("img")),
            ("[parameters('count')]", json!(3)),
            ("[parameters('later')]", json!("img-3")),
            ("[variables('v1')]", json!("img-v")),
            ("[variables('V2')]", json!("IMG-V")),
            ("[variables('o')]", json!({"a": 3, "k1": "[literal]"})),
            ("[variables('o').a]", json!(3)),
            ("[variables('arr')[1]]", json!(2)),
            ("[parameters('obj').key]", json!("v")),
            ("[parameters('obj')['nested'].x]", json!(1)),
            ("[concat('a', 'b', 'c')]", json!("abc")),
            ("[concat(createArray(1, 2), createArray(3))]", json!([1, 2, 3])),
            ("[concat('n', 1, true())]", json!("n1True")),
            ("[format('{0}, {1}. Formatted number: {2:N0}', 'Hello', 'User', 8175133)]", json!("Hello, User. Formatted number: 8,175,133")),
            ("[format('{{literal}} {0}', 'x')]", json!("{literal} x")),
            ("[format('{0:D4}-{1,5}|{2,-3}|', 7, 'ab', 'c')]", json!("0007-   ab|c  |")),
            ("[format('{0:N2} {1:X} {2:000}', 1234, 255, 7)]", json!("1,234.00 FF 007")),
            ("[format('{0} {1}', true(), parameters('list'))]", json!("True [\"a\",\"b\",\"c\"]")),
            ("[toLower('ABC')]", json!("abc")),
            ("[toUpper('abc')]", json!("ABC")),
            ("[string(createObject('valueA', 10, 'valueB', 'Example Text'))]", json!("{\"valueA\":10,\"valueB\":\"Example Text\"}")),
            ("[string(createArray('a', 'b', 'c'))]", json!("[\"a\",\"b\",\"c\"]")),
            ("[string(5)]", json!("5")),
            ("[string(true())]", json!("True")),
            ("[int('4')]", json!(4)),
            ("[bool('TRUE')]", json!(true)),
            ("[bool(0)]", json!(false)),
            ("[replace('123-123-1234', '-', '')]", json!("1231231234")),
            ("[substring('hello there', 6, 5)]", json!("there")),
            ("[substring('hello', 1)]", json!("ello")),
            ("[length('abc')]", json!(3)),
            ("[length(createArray(1, 2))]", json!(2)),
            ("[length(parameters('obj'))]", json!(2)),
            ("[empty('')]", json!(true)),
            ("[empty(createArray())]", json!(true)),
            ("[empty(createObject())]", json!(true)),
            ("[empty(null())]", json!(true)),
            ("[empty('a')]", json!(false)),
            ("[if(equals(parameters('count'), 3), 'yes', 'no')]", json!("yes")),
            ("[if(false(), parameters('noSuchParameter'), 'lazy')]", json!("lazy")),
            ("[if(true(), createObject('subnetId', 'x'), null())]", json!({"subnetId": "x"})),
            ("[equals(createArray(1, 2), createArray(1, 2))]", json!(true)),
            ("[equals('a', 'A')]", json!(false)),
            ("[not(true())]", json!(false)),
            ("[and(true(), false())]", json!(false)),
            ("[and(true(), true(), true())]", json!(true)),
            ("[or(false(), true())]", json!(true)),
            ("[or(true(), parameters('noSuchParameter'))]", json!(true)),
            ("[coalesce(null(), null(), 'x')]", json!("x")),
            ("[coalesce(null())]", JV::Null),
            ("[createObject('a', 1, 'b', createArray('x'))]", json!({"a": 1, "b": ["x"]})),
            ("[json('{\"a\": [1, true]}')]", json!({"a": [1, true]})),
            ("[json('null')]", JV::Null),
            ("[split('one,two,three', ',')]", json!(["one", "two", "three"])),
            ("[split('one;two,three', createArray(',', ';'))]", json!(["one", "two", "three"])),
            ("[trim('  x  ')]", json!("x")),
            ("[first(createArray('one', 'two'))]", json!("one")),
            ("[first('One Two')]", json!("O")),
            ("[last('One Two Three')]", json!("e")),
            ("[last(createArray(1, 2, 3))]", json!(3)),
            ("[contains('OneTwoThree', 'e')]", json!(true)),
            ("[contains('OneTwoThree', 'z')]", json!(false)),
            ("[contains('abc', 'B')]", json!(false)),
            ("[contains(parameters('obj'), 'KEY')]", json!(true)),
            ("[contains(parameters('list'), 'b')]", json!(true)),
            ("[startsWith('abcdef', 'AB')]", json!(true)),
            ("[endsWith('abcdef', 'EF')]", json!(true)),
            ("[indexOf('abcdef', 'CD')]", json!(2)),
            ("[lastIndexOf('abcabc', 'b')]", json!(4)),
            ("[indexOf('abc', 'z')]", json!(-1)),
            (
                "[union(createObject('a', 'b', 'c', createObject('x', 1)), createObject('c', createObject('y', 2), 'd', 'e'))]",
                json!({"a": "b", "c": {"x": 1, "y": 2}, "d": "e"}),
            ),
            ("[union(createArray('one', 'two'), createArray('two', 'three'))]", json!(["one", "two", "three"])),
            ("[string(union(createObject('one', 'a', 'two', 'b', 'three', 'c1'), createObject('three', 'c2', 'four', 'd')))]", json!("{\"one\":\"a\",\"two\":\"b\",\"three\":\"c2\",\"four\":\"d\"}")),
            ("[format('{0:é} {0:0x}', 5)]", json!("5 5")),
            ("[intersection(createArray('a', 'b', 'c'), createArray('b', 'c', 'd'))]", json!(["b", "c"])),
            ("[take(createArray('one', 'two', 'three'), 2)]", json!(["one", "two"])),
            ("[skip('one two three', 4)]", json!("two three")),
            ("[take('abc', 10)]", json!("abc")),
            ("[skip(createArray(1), -1)]", json!([1])),
            ("[join(createArray('a', 'b'), '-')]", json!("a-b")),
            ("[range(1, 3)]", json!([1, 2, 3])),
            ("[min(3, 1, 2)]", json!(1)),
            ("[max(createArray(1, 5))]", json!(5)),
            ("[add(1, 2)]", json!(3)),
            ("[sub(5, 7)]", json!(-2)),
            ("[mul(3, 4)]", json!(12)),
            ("[div(7, 2)]", json!(3)),
            ("[mod(7, 2)]", json!(1)),
            ("[padLeft('123', 6, '0')]", json!("000123")),
            ("[padLeft(7, 3, '0')]", json!("007")),
            ("[base64('one, two, three')]", json!("b25lLCB0d28sIHRocmVl")),
            ("[base64ToString('b25lLCB0d28sIHRocmVl')]", json!("one, two, three")),
            ("[base64ToJson(base64('{\"one\": \"a\"}'))]", json!({"one": "a"})),
            ("[uriComponent('http://contoso.com/resources/nested/azuredeploy.json')]", json!("http%3A%2F%2Fcontoso.com%2Fresources%2Fnested%2Fazuredeploy.json")),
            ("[uriComponentToString('http%3A%2F%2Fcontoso.com')]", json!("http://contoso.com")),
            ("[uri('http://contoso.org/firstpath', 'myscript.sh')]", json!("http://contoso.org/myscript.sh")),
            ("[uri('http://contoso.org/firstpath/', 'myscript.sh')]", json!("http://contoso.org/firstpath/myscript.sh")),
            ("[uri('https://host/a/b?x=1', '/c')]", json!("https://host/c")),
            ("[dataUri('Hello')]", json!("data:text/plain;charset=utf8;base64,SGVsbG8=")),
            ("[dataUriToString('data:;base64,SGVsbG8sIFdvcmxkIQ==')]", json!("Hello, World!")),
            ("[resourceGroup().location]", json!("westeurope")),
            ("[resourceGroup().name]", json!("rg-build")),
            ("[resourceGroup().id]", json!(rg_id)),
            ("[subscription().id]", json!(format!("/subscriptions/{SUB}"))),
            ("[subscription().subscriptionId]", json!(SUB)),
            ("[subscription().tenantId]", json!("99999999-8888-7777-6666-555555555555")),
            ("[tenant().tenantId]", json!("99999999-8888-7777-6666-555555555555")),
            ("[deployment().name]", json!("dep1")),
            ("[deployment().properties.template.contentVersion]", json!("1.0.0.0")),
            ("[environment().suffixes.storage]", json!("core.windows.net")),
            (
                "[resourceId('Microsoft.Network/virtualNetworks/subnets', 'vnet', 'sub')]",
                json!(format!("{rg_id}/providers/Microsoft.Network/virtualNetworks/vnet/subnets/sub")),
            ),
            (
                "[resourceId('Microsoft.Compute/galleries/images', 'gal/img')]",
                json!(format!("{rg_id}/providers/Microsoft.Compute/galleries/gal/images/img")),
            ),
            (
                "[resourceId('otherRg', 'Microsoft.Compute/images', 'img')]",
                json!(format!("/subscriptions/{SUB}/resourceGroups/otherRg/providers/Microsoft.Compute/images/img")),
            ),
            (
                "[resourceId('sub2', 'otherRg', 'Microsoft.Compute/images', 'img')]",
                json!("/subscriptions/sub2/resourceGroups/otherRg/providers/Microsoft.Compute/images/img"),
            ),
            (
                "[subscriptionResourceId('Microsoft.Authorization/roleDefinitions', 'abc')]",
                json!(format!("/subscriptions/{SUB}/providers/Microsoft.Authorization/roleDefinitions/abc")),
            ),
            ("[tenantResourceId('Microsoft.Authorization/policyDefinitions', 'p')]", json!("/providers/Microsoft.Authorization/policyDefinitions/p")),
            (
                "[extensionResourceId('/subscriptions/S/resourceGroups/rg', 'Microsoft.Authorization/locks', 'lk')]",
                json!("/subscriptions/S/resourceGroups/rg/providers/Microsoft.Authorization/locks/lk"),
            ),
            // Reference values: uniqueString("test") as computed by Azure.Deployments.Expression;
            // guid() is a version-5 UUID in the documented ARM namespace over the arguments
            // joined by '-' (checked against Python's uuid.uuid5).
            ("[uniqueString('test')]", json!("rbgf3xv4ufgzg")),
            ("[guid('hello')]", json!("520f8434-fe3a-5d99-888d-450a827486a1")),
            ("[guid('a', 'b', 'c')]", json!("a98fa280-e03f-5afa-8d8e-92d0a9c201e8")),
            ("[map(createArray(1, 2, 3), lambda('x', mul(lambdaVariables('x'), 2)))]", json!([2, 4, 6])),
            ("[map(createArray('a', 'b'), lambda('x', 'i', concat(lambdaVariables('x'), string(lambdaVariables('i')))))]", json!(["a0", "b1"])),
            ("[filter(parameters('list'), lambda('x', not(equals(lambdaVariables('x'), 'b'))))]", json!(["a", "c"])),
            ("[reduce(createArray(1, 2, 3), 0, lambda('cur', 'next', add(lambdaVariables('cur'), lambdaVariables('next'))))]", json!(6)),
            ("[sort(createArray(3, 1, 2, 5, 4), lambda('a', 'b', less(lambdaVariables('a'), lambdaVariables('b'))))]", json!([1, 2, 3, 4, 5])),
            ("[toObject(createArray('a', 'b'), lambda('x', lambdaVariables('x')), lambda('x', toUpper(lambdaVariables('x'))))]", json!({"a": "A", "b": "B"})),
            ("[items(createObject('b', 2, 'a', 1))]", json!([{"key": "a", "value": 1}, {"key": "b", "value": 2}])),
            ("[objectKeys(createObject('b', 2, 'a', 1))]", json!(["b", "a"])),
            ("[greater(10, 5)]", json!(true)),
            ("[greaterOrEquals(5, 5)]", json!(true)),
            ("[less('b', 'a')]", json!(false)),
            ("[lessOrEquals('a', 'b')]", json!(true)),
            ("[array('x')]", json!(["x"])),
            ("[true]", json!(true)),
        ];
        let mut failures = Vec::new();
        for (expr, want) in &table {
            let p = probe(expr);
            if p.value.as_ref() != Some(want) {
                failures.push(format!(
                    "{expr}\n   want {want}\n   got  {:?}\n   diags {:?}",
                    p.value,
                    p.diags.iter().map(|d| &d.message).collect::<Vec<_>>()
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} failed:\n{}",
            failures.len(),
            table.len(),
            failures.join("\n")
        );
    }

    #[test]
    fn errors_are_located_inside_the_expression() {
        // (expression, code, message fragment, text the diagnostic's span covers)
        let table: &[(&str, &str, &str, &str)] = &[
            (
                "[reference('x').id]",
                UNSUPPORTED_ARM_FUNCTION,
                "reference() reads the live state",
                "reference",
            ),
            (
                "[listKeys('x', '2020-01-01').keys[0].value]",
                UNSUPPORTED_ARM_FUNCTION,
                "listKeys()",
                "listKeys",
            ),
            (
                "[concat('a', dateTimeAdd('2020', 'P1D'))]",
                UNSUPPORTED_ARM_FUNCTION,
                "dateTimeAdd",
                "dateTimeAdd",
            ),
            (
                "[fooBar(1)]",
                ARM_EXPRESSION_ERROR,
                "'fooBar' is not an ARM template function",
                "fooBar",
            ),
            (
                "[concat('a', ]",
                ARM_EXPRESSION_ERROR,
                "ends too early",
                "]",
            ),
            (
                "[concat('a' 'b')]",
                ARM_EXPRESSION_ERROR,
                "unexpected `'`",
                "'",
            ),
            (
                "[concat('a')) ]",
                ARM_EXPRESSION_ERROR,
                "after the end of the expression",
                ")",
            ),
            (
                "[concat('a]",
                ARM_EXPRESSION_ERROR,
                "unterminated string literal",
                "'",
            ),
            (
                "[resourceGroup.location]",
                ARM_EXPRESSION_ERROR,
                "is not a function call",
                "resourceGroup.location",
            ),
            ("[1.5]", ARM_EXPRESSION_ERROR, "decimal numbers", "1."),
            ("[]", ARM_EXPRESSION_ERROR, "empty expression", "[]"),
            (
                "[parameters('missing')]",
                ARM_EXPRESSION_ERROR,
                "declares no parameter 'missing'",
                "'missing'",
            ),
            (
                "[variables('nope')]",
                ARM_EXPRESSION_ERROR,
                "declares no variable 'nope'",
                "'nope'",
            ),
            (
                "[substring('abc', 2, 5)]",
                ARM_EXPRESSION_ERROR,
                "do not fit in a string of 3",
                "substring('abc', 2, 5)",
            ),
            (
                "[int('x1')]",
                ARM_EXPRESSION_ERROR,
                "'x1' is not an integer",
                "'x1'",
            ),
            (
                "[if('yes', 1, 2)]",
                ARM_EXPRESSION_ERROR,
                "first argument of if() must be a boolean",
                "'yes'",
            ),
            (
                "[if(true(), 1)]",
                ARM_EXPRESSION_ERROR,
                "if() takes 3 arguments, got 2",
                "if(true(), 1)",
            ),
            (
                "[createObject('a')]",
                ARM_EXPRESSION_ERROR,
                "key/value pairs",
                "createObject('a')",
            ),
            (
                "[format('{1}', 'a')]",
                ARM_EXPRESSION_ERROR,
                "placeholder {1} refers to argument 1",
                "format('{1}', 'a')",
            ),
            (
                "[format('{0', 'a')]",
                ARM_EXPRESSION_ERROR,
                "unclosed",
                "format('{0', 'a')",
            ),
            (
                "[variables('arr')[5]]",
                ARM_EXPRESSION_ERROR,
                "index 5 is out of range",
                "[5]",
            ),
            (
                "[parameters('obj').missing]",
                ARM_EXPRESSION_ERROR,
                "property 'missing' doesn't exist; available properties: Key, nested",
                ".missing",
            ),
            (
                "[parameters('name').x]",
                ARM_EXPRESSION_ERROR,
                "cannot read property 'x' of a string",
                ".x",
            ),
            (
                "[utcNow()]",
                ARM_EXPRESSION_ERROR,
                "utcNow() can only be used in a parameter's defaultValue",
                "utcNow",
            ),
            (
                "[newGuid()]",
                ARM_EXPRESSION_ERROR,
                "newGuid() can only be used",
                "newGuid",
            ),
            (
                "[copyIndex()]",
                ARM_EXPRESSION_ERROR,
                "copyIndex() without a loop name",
                "copyIndex()",
            ),
            (
                "[copyIndex('loop')]",
                ARM_EXPRESSION_ERROR,
                "no copy loop named 'loop'",
                "copyIndex('loop')",
            ),
            (
                "[json('{bad')]",
                ARM_EXPRESSION_ERROR,
                "not valid JSON",
                "'{bad'",
            ),
            (
                "[concat('a', createObject())]",
                ARM_EXPRESSION_ERROR,
                "second argument of concat() must be a string",
                "createObject()",
            ),
            (
                "[resourceId('vnet')]",
                ARM_EXPRESSION_ERROR,
                "resourceId() takes at least 2 arguments",
                "resourceId('vnet')",
            ),
            (
                "[resourceId('a', 'b')]",
                ARM_EXPRESSION_ERROR,
                "no resource type argument",
                "resourceId('a', 'b')",
            ),
            (
                "[resourceId('Microsoft.Network/virtualNetworks/subnets', 'vnet')]",
                ARM_EXPRESSION_ERROR,
                "needs 2 names, got 1",
                "resourceId('Microsoft.Network/virtualNetworks/subnets', 'vnet')",
            ),
            (
                "[add(9223372036854775807, 1)]",
                ARM_EXPRESSION_ERROR,
                "integer overflow",
                "add(9223372036854775807, 1)",
            ),
            ("[div(1, 0)]", ARM_EXPRESSION_ERROR, "division by zero", "0"),
            (
                "[range(0, 100000)]",
                ARM_EXPRESSION_ERROR,
                "range(): count must be from 0 to 10000",
                "range(0, 100000)",
            ),
            (
                "[lambda('x', 1)]",
                ARM_EXPRESSION_ERROR,
                "lambda() can only be an argument",
                "lambda",
            ),
            (
                "[map(createArray(1), 'x')]",
                ARM_EXPRESSION_ERROR,
                "map() expects lambda('x', ...)",
                "'x'",
            ),
            (
                "[lambdaVariables('y')]",
                ARM_EXPRESSION_ERROR,
                "no lambda variable 'y'",
                "'y'",
            ),
            (
                "[contoso.uniqueName('a')]",
                ARM_EXPRESSION_ERROR,
                "defines no user function 'contoso.uniqueName'",
                "contoso.uniqueName",
            ),
            (
                "[replace('abc', '', 'x')]",
                ARM_EXPRESSION_ERROR,
                "must not be empty",
                "''",
            ),
            (
                "[padLeft('a', 3, 'xy')]",
                ARM_EXPRESSION_ERROR,
                "single character",
                "'xy'",
            ),
            (
                "[union(createArray(1), createObject())]",
                ARM_EXPRESSION_ERROR,
                "all arrays or all objects",
                "createObject()",
            ),
            (
                "[not('true')]",
                ARM_EXPRESSION_ERROR,
                "first argument of not() must be a boolean",
                "'true'",
            ),
        ];
        let mut failures = Vec::new();
        for (expr, code, msg, at) in table {
            let p = probe(expr);
            let hit = p
                .diags
                .iter()
                .find(|d| d.code == *code && d.message.contains(msg));
            match hit {
                Some(d) if text(&p.src, d.span) == *at => {}
                Some(d) => failures.push(format!(
                    "{expr}: span covers {:?}, want {at:?}",
                    text(&p.src, d.span)
                )),
                None => failures.push(format!(
                    "{expr}: no {code} containing {msg:?} in {:?}",
                    p.diags
                )),
            }
            if p.value.is_some() {
                failures.push(format!("{expr}: expected the value to stay unresolved"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn unsupported_function_message_lists_what_kiln_evaluates() {
        let p = probe("[reference('x')]");
        let d = p
            .diags
            .iter()
            .find(|d| d.code == UNSUPPORTED_ARM_FUNCTION)
            .unwrap();
        assert!(
            d.message.contains("concat") && d.message.contains("uniqueString"),
            "{}",
            d.message
        );
        assert!(d.fix.contains("-p NAME=VALUE"));
    }

    #[test]
    fn strings_with_escapes_point_at_the_whole_string() {
        let expr = "[concat('say \"hi\"', fooBar())]";
        let p = probe(expr);
        let d = p
            .diags
            .iter()
            .find(|d| d.message.contains("fooBar"))
            .unwrap();
        assert_eq!(text(&p.src, d.span), serde_json::to_string(expr).unwrap());
    }

    const IT: &str = r#"{
  "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
  "contentVersion": "1.0.0.0",
  "parameters": {
    "imageTemplateName": {"type": "string"},
    "api-version": {"type": "string", "defaultValue": "2022-02-14"},
    "svclocation": {"type": "string", "defaultValue": "[resourceGroup().location]"},
    "sku": {"type": "string", "defaultValue": "22_04-lts", "allowedValues": ["22_04-lts", "20_04-lts"]},
    "timeout": {"type": "int", "defaultValue": 60, "minValue": 6, "maxValue": 960},
    "stamp": {"type": "string", "defaultValue": "[utcNow()]"}
  },
  "variables": {
    "identityId": "[resourceId('Microsoft.ManagedIdentity/userAssignedIdentities', 'aibIdentity')]"
  },
  "resources": [
    {
      "name": "[parameters('imageTemplateName')]",
      "type": "Microsoft.VirtualMachineImages/imageTemplates",
      "apiVersion": "[parameters('api-version')]",
      "location": "[parameters('svclocation')]",
      "identity": {"type": "UserAssigned", "userAssignedIdentities": {"[variables('identityId')]": {}}},
      "properties": {
        "buildTimeoutInMinutes": "[parameters('timeout')]",
        "source": {"type": "PlatformImage", "publisher": "Canonical", "sku": "[parameters('sku')]", "version": "latest"},
        "customize": [{"type": "Shell", "name": "stamp", "inline": ["[concat('echo ', parameters('stamp'))]"]}],
        "distribute": [{"type": "ManagedImage", "imageId": "[resourceId('Microsoft.Compute/images', parameters('imageTemplateName'))]", "location": "[parameters('svclocation')]", "runOutputName": "out"}]
      }
    }
  ]
}"#;

    fn run(src: &str, params: &[(&str, JV)]) -> (Vec<EvaluatedResource>, Vec<ArmDiag>) {
        let root = parse(src).unwrap().root;
        let params: Vec<(String, JV)> = params
            .iter()
            .map(|(k, v)| ((*k).to_string(), v.clone()))
            .collect();
        evaluate_image_templates(&root, &params, &ctx())
    }

    fn span_of(src: &str, needle: &str) -> Span {
        let i = src
            .find(needle)
            .unwrap_or_else(|| panic!("{needle} not in source"));
        Span::new(i, i + needle.len())
    }

    #[test]
    fn evaluated_values_take_the_expression_span_and_literals_keep_theirs() {
        let (res, diags) = run(IT, &[("imageTemplateName", json!("myTemplate"))]);
        assert!(diags.is_empty(), "{diags:?}");
        assert_eq!(res.len(), 1);
        let r = &res[0];
        assert!(r.unresolved.is_empty());
        let n = &r.node;
        let name = n.get("name").unwrap();
        assert_eq!(name.as_str(), Some("myTemplate"));
        assert_eq!(
            name.span,
            span_of(IT, "\"[parameters('imageTemplateName')]\"")
        );
        let ty = n.get("type").unwrap();
        assert_eq!(
            ty.span,
            span_of(IT, "\"Microsoft.VirtualMachineImages/imageTemplates\"")
        );
        let j = n.to_json();
        assert_eq!(j["apiVersion"], json!("2022-02-14"));
        assert_eq!(j["location"], json!("westeurope"));
        let id = format!("/subscriptions/{SUB}/resourceGroups/rg-build/providers/Microsoft.ManagedIdentity/userAssignedIdentities/aibIdentity");
        assert_eq!(
            j["identity"]["userAssignedIdentities"],
            json!({ id.clone(): {} })
        );
        let (key, _) = n
            .get("identity")
            .unwrap()
            .get("userAssignedIdentities")
            .unwrap()
            .as_object()
            .unwrap()[0]
            .clone();
        assert_eq!(key.span, span_of(IT, "\"[variables('identityId')]\""));
        let props = n.get("properties").unwrap();
        let timeout = props.get("buildTimeoutInMinutes").unwrap();
        assert_eq!(timeout.to_json(), json!(60));
        assert_eq!(timeout.span, span_of(IT, "\"[parameters('timeout')]\""));
        assert_eq!(j["properties"]["distribute"][0]["imageId"], json!(format!("/subscriptions/{SUB}/resourceGroups/rg-build/providers/Microsoft.Compute/images/myTemplate")));
        // utcNow() in a defaultValue is allowed; its default format is yyyyMMddTHHmmssZ
        let line = j["properties"]["customize"][0]["inline"][0]
            .as_str()
            .unwrap()
            .to_string();
        let stamp = line.strip_prefix("echo ").unwrap();
        assert_eq!(stamp.len(), 16, "{stamp}");
        assert!(
            stamp.as_bytes()[8] == b'T'
                && stamp.ends_with('Z')
                && stamp[..8].bytes().all(|b| b.is_ascii_digit()),
            "{stamp}"
        );
        let pub_node = props.get("source").unwrap().get("publisher").unwrap();
        assert_eq!(pub_node.span, span_of(IT, "\"Canonical\""));
    }

    #[test]
    fn missing_parameter_is_reported_at_its_declaration_and_left_unresolved() {
        let (res, diags) = run(IT, &[]);
        let d: Vec<&ArmDiag> = diags
            .iter()
            .filter(|d| d.code == MISSING_PARAMETER)
            .collect();
        assert_eq!(d.len(), 1, "{diags:?}");
        assert!(d[0].message.contains("parameter 'imageTemplateName' has no value: pass --parameters FILE or -p imageTemplateName=VALUE"));
        assert_eq!(text(IT, d[0].span), "\"imageTemplateName\"");
        assert_eq!(diags.len(), 1, "{diags:?}");
        let r = &res[0];
        let name = r.node.get("name").unwrap();
        assert_eq!(name.as_str(), Some("[parameters('imageTemplateName')]"));
        assert!(r.unresolved.contains(&name.span));
        let image_id = span_of(
            IT,
            "\"[resourceId('Microsoft.Compute/images', parameters('imageTemplateName'))]\"",
        );
        assert!(r.unresolved.contains(&image_id));
        assert_eq!(r.unresolved.len(), 2);
        // everything else is still evaluated
        assert_eq!(r.node.to_json()["location"], json!("westeurope"));
    }

    #[test]
    fn parameter_values_are_checked_and_command_line_strings_coerced() {
        let (res, diags) = run(
            IT,
            &[
                ("imageTemplateName", json!("t")),
                ("timeout", json!("120")),
                ("sku", json!("18_04-lts")),
            ],
        );
        assert_eq!(
            res[0].node.to_json()["properties"]["buildTimeoutInMinutes"],
            json!(120)
        );
        let d = diags
            .iter()
            .find(|d| d.message.contains("allowedValues"))
            .expect("allowedValues diag");
        assert_eq!(d.code, ARM_EXPRESSION_ERROR);
        assert!(
            d.message.contains("\"22_04-lts\", \"20_04-lts\"") && d.message.contains("'sku'"),
            "{}",
            d.message
        );
        assert_eq!(text(IT, d.span), "\"sku\"");
        let (_, diags) = run(
            IT,
            &[
                ("imageTemplateName", json!("t")),
                ("timeout", json!("soon")),
            ],
        );
        assert!(
            diags.iter().any(|d| d
                .message
                .contains("the value 'soon' given for parameter 'timeout' is not a valid int")),
            "{diags:?}"
        );
        let unused = IT.replace(
            "\"stamp\": {",
            "\"unused\": {\"type\": \"bool\"}, \"stamp\": {",
        );
        let (_, diags) = run(
            &unused,
            &[
                ("imageTemplateName", json!("t")),
                ("unused", json!("maybe")),
            ],
        );
        assert!(
            diags.iter().any(|d| d
                .message
                .contains("'maybe' given for parameter 'unused' is not a valid bool")),
            "given values are checked even when unused: {diags:?}"
        );
        let (_, diags) = run(
            IT,
            &[("imageTemplateName", json!("t")), ("timeout", json!(2))],
        );
        assert!(
            diags
                .iter()
                .any(|d| d.message.contains("is 2, below its minValue 6")),
            "{diags:?}"
        );
        let (_, diags) = run(IT, &[("imageTemplateName", json!(5))]);
        assert!(
            diags.iter().any(|d| d
                .message
                .contains("declared as string but its value is an integer")),
            "{diags:?}"
        );
        let (_, diags) = run(
            IT,
            &[
                ("imageTemplateName", json!("t")),
                ("imageTemplatename", json!("u")),
                ("nosuch", json!(1)),
            ],
        );
        let d = diags
            .iter()
            .find(|d| d.message.contains("'nosuch'"))
            .expect("unknown parameter diag");
        assert!(
            d.message.contains("declares no such parameter")
                && d.message.contains("imageTemplateName, api-version"),
            "{}",
            d.message
        );
        assert_eq!(diags.len(), 1, "{diags:?}");
    }

    #[test]
    fn typed_values_from_the_command_line() {
        let src = r#"{"$schema": "x/deploymentTemplate.json#", "parameters": {
            "n": {"type": "int"}, "b": {"type": "bool"}, "a": {"type": "array"}, "o": {"type": "object"}},
          "resources": [{"type": "microsoft.virtualmachineimages/IMAGETEMPLATES", "name": "x",
            "properties": {"n": "[parameters('n')]", "b": "[parameters('b')]", "a": "[parameters('a')]", "o": "[parameters('o').k]"}}]}"#;
        let (res, diags) = run(
            src,
            &[
                ("n", json!("7")),
                ("b", json!("True")),
                ("a", json!("[1, \"x\"]")),
                ("o", json!("{\"k\": [true]}")),
            ],
        );
        assert!(diags.is_empty(), "{diags:?}");
        assert_eq!(
            res[0].node.to_json()["properties"],
            json!({"n": 7, "b": true, "a": [1, "x"], "o": [true]})
        );
    }

    #[test]
    fn parameters_files() {
        let ok = parse(r#"{"$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentParameters.json#", "contentVersion": "1.0.0.0",
            "parameters": {"a": {"value": "x"}, "b": {"value": {"k": [1]}}, "c": {"value": "[notEvaluated()]"}}}"#).unwrap().root;
        assert_eq!(
            parse_parameters_file(&ok).unwrap(),
            vec![
                ("a".to_string(), json!("x")),
                ("b".to_string(), json!({"k": [1]})),
                ("c".to_string(), json!("[notEvaluated()]"))
            ]
        );
        let bare = parse(r#"{"a": {"value": 1}}"#).unwrap().root;
        assert_eq!(
            parse_parameters_file(&bare).unwrap(),
            vec![("a".to_string(), json!(1))]
        );
        let src = r#"{"parameters": {"pw": {"reference": {"keyVault": {"id": "/subscriptions/x/resourceGroups/y/providers/Microsoft.KeyVault/vaults/v"}, "secretName": "adminPw"}}}}"#;
        let kv = parse(src).unwrap().root;
        let e = parse_parameters_file(&kv).unwrap_err();
        assert!(
            e.message.contains("Key Vault")
                && e.message.contains("'pw'")
                && e.message.contains("adminPw"),
            "{}",
            e.message
        );
        assert!(e.fix.contains("-p pw=VALUE"));
        assert!(text(src, e.span).starts_with("{\"reference\""));
        let novalue = parse(r#"{"parameters": {"a": {"val": 1}}}"#).unwrap().root;
        assert!(parse_parameters_file(&novalue)
            .unwrap_err()
            .message
            .contains("no \"value\""));
        let tpl = parse(IT).unwrap().root;
        assert!(parse_parameters_file(&tpl)
            .unwrap_err()
            .message
            .contains("deployment template, not a parameters file"));
        let arr = parse("[1]").unwrap().root;
        assert!(parse_parameters_file(&arr).is_err());
    }

    #[test]
    fn deployment_template_detection() {
        let yes = [
            r#"{"$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#", "resources": []}"#,
            r#"{"$schema": "https://schema.management.azure.com/schemas/2018-05-01/subscriptionDeploymentTemplate.json#"}"#,
            r#"{"contentVersion": "1.0.0.0", "resources": []}"#,
            r#"{"parameters": {}, "resources": {"a": {}}}"#,
        ];
        let no = [
            r#"{"type": "Microsoft.VirtualMachineImages/imageTemplates", "properties": {}}"#,
            r#"{"location": "x", "properties": {"source": {}}}"#,
            r#"{"$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentParameters.json#", "parameters": {}}"#,
            r#"{"resources": []}"#,
            "[]",
        ];
        for s in yes {
            assert!(is_deployment_template(&parse(s).unwrap().root), "{s}");
        }
        for s in no {
            assert!(!is_deployment_template(&parse(s).unwrap().root), "{s}");
        }
    }

    #[test]
    fn variables_cycles_and_laziness() {
        let src = r#"{"$schema": "x/deploymentTemplate.json#",
          "parameters": {"unused": {"type": "string"}},
          "variables": {"a": "[variables('b')]", "b": "[concat(variables('a'), 'x')]", "ok": "fine", "broken": "[nope()]",
                        "self": "[variables('self')]"},
          "resources": [
            {"type": "Microsoft.Storage/storageAccounts", "name": "[reference('whatever').x]", "properties": {"x": "[variables('broken')]"}},
            {"type": "Microsoft.VirtualMachineImages/imageTemplates", "name": "[variables('ok')]",
             "properties": {"c": "[variables('a')]", "d": "[variables('self')]", "e": "[variables('a')]"}}]}"#;
        let (res, diags) = run(src, &[]);
        assert_eq!(res.len(), 1);
        let cycles: Vec<&ArmDiag> = diags
            .iter()
            .filter(|d| d.message.contains("depends on itself"))
            .collect();
        assert_eq!(cycles.len(), 2, "{diags:?}");
        assert!(cycles
            .iter()
            .any(|d| d.message.contains("variable 'a'") || d.message.contains("variable 'b'")));
        assert_eq!(
            diags.len(),
            2,
            "unrelated resources, unused variables and parameters are not evaluated: {diags:?}"
        );
        assert_eq!(res[0].node.get("name").unwrap().as_str(), Some("fine"));
        assert_eq!(res[0].unresolved.len(), 3);
    }

    #[test]
    fn parameter_default_rules() {
        let src = r#"{"$schema": "x/deploymentTemplate.json#",
          "parameters": {"a": {"type": "string", "defaultValue": "[parameters('b')]"}, "b": {"type": "string", "defaultValue": "[parameters('a')]"},
                         "c": {"type": "string", "defaultValue": "[variables('v')]"}, "g": {"type": "string", "defaultValue": "[newGuid()]"},
                         "t": {"type": "string", "defaultValue": "[utcNow('yyyy-MM-dd HH:mm')]"}},
          "variables": {"v": "x"},
          "resources": [{"type": "Microsoft.VirtualMachineImages/imageTemplates", "name": "n",
             "properties": {"a": "[parameters('a')]", "c": "[parameters('c')]", "g": "[parameters('g')]", "g2": "[parameters('g')]", "t": "[parameters('t')]"}}]}"#;
        let (res, diags) = run(src, &[]);
        assert!(
            diags
                .iter()
                .any(|d| d.message.contains("parameter 'a' depends on itself")
                    || d.message.contains("parameter 'b' depends on itself")),
            "{diags:?}"
        );
        assert!(
            diags.iter().any(|d| d
                .message
                .contains("variables() cannot be used in a parameter's defaultValue")),
            "{diags:?}"
        );
        let j = res[0].node.to_json();
        let g = j["properties"]["g"].as_str().unwrap();
        assert_eq!(g.len(), 36);
        assert_eq!(&g[14..15], "4");
        assert_eq!(
            j["properties"]["g"], j["properties"]["g2"],
            "a parameter is evaluated once"
        );
        let t = j["properties"]["t"].as_str().unwrap();
        assert_eq!(t.len(), 16);
        assert_eq!(&t[4..5], "-");
        assert_eq!(&t[10..11], " ");
    }

    #[test]
    fn child_resources_and_symbolic_names() {
        let src = r#"{"$schema": "x/deploymentTemplate.json#", "languageVersion": "2.0",
          "parameters": {"p": {"type": "string", "defaultValue": "v"}},
          "resources": {
             "gallery": {"type": "Microsoft.Compute/galleries", "name": "g",
                         "resources": [{"type": "Microsoft.VirtualMachineImages/imageTemplates", "name": "[concat('child-', parameters('p'))]"}]},
             "it": {"type": "Microsoft.VirtualMachineImages/imageTemplates", "name": "top"},
             "old": {"type": "Microsoft.VirtualMachineImages/imageTemplates", "name": "existing-one", "existing": true}}}"#;
        let (res, diags) = run(src, &[]);
        assert!(diags.is_empty(), "{diags:?}");
        let names: Vec<String> = res
            .iter()
            .map(|r| r.node.to_json()["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(names, vec!["child-v", "top"]);
    }

    #[test]
    fn nested_deployments_outer_and_inner_scope() {
        let src = r#"{"$schema": "x/deploymentTemplate.json#",
          "parameters": {"loc": {"type": "string", "defaultValue": "northeurope"}, "rgName": {"type": "string", "defaultValue": "rg-images"}},
          "variables": {"v": "outer-var"},
          "resources": [
            {"type": "Microsoft.Resources/deployments", "name": "outerScoped",
             "properties": {"mode": "Incremental", "template": {"resources": [
                {"type": "Microsoft.VirtualMachineImages/imageTemplates", "name": "[variables('v')]", "location": "[parameters('loc')]"}]}}},
            {"type": "Microsoft.Resources/deployments", "name": "[concat('inner-', parameters('rgName'))]", "resourceGroup": "[parameters('rgName')]",
             "properties": {"expressionEvaluationOptions": {"scope": "inner"}, "mode": "Incremental",
               "parameters": {"location": {"value": "[parameters('loc')]"}, "identity": {"value": "[reference('uai').outputs.id.value]"}},
               "template": {"$schema": "x/deploymentTemplate.json#",
                 "parameters": {"location": {"type": "string"}, "identity": {"type": "string"}, "fallback": {"type": "string", "defaultValue": "fb"}, "none": {"type": "string"}},
                 "variables": {"v": "inner-var"},
                 "resources": [{"type": "Microsoft.VirtualMachineImages/imageTemplates", "name": "[variables('v')]",
                   "location": "[parameters('location')]",
                   "properties": {"rg": "[resourceGroup().name]", "dep": "[deployment().name]", "fb": "[parameters('fallback')]",
                                  "id": "[parameters('identity')]", "none": "[parameters('none')]"}}]}}},
            {"type": "Microsoft.Resources/deployments", "name": "linked", "properties": {"templateLink": {"uri": "https://x"}}}]}"#;
        let (res, diags) = run(src, &[]);
        assert_eq!(res.len(), 2, "{diags:?}");
        let a = res[0].node.to_json();
        assert_eq!(
            (a["name"].as_str(), a["location"].as_str()),
            (Some("outer-var"), Some("northeurope"))
        );
        let b = res[1].node.to_json();
        assert_eq!(b["name"], json!("inner-var"));
        assert_eq!(b["location"], json!("northeurope"));
        assert_eq!(b["properties"]["rg"], json!("rg-images"));
        assert_eq!(b["properties"]["dep"], json!("inner-rg-images"));
        assert_eq!(b["properties"]["fb"], json!("fb"));
        assert_eq!(b["properties"]["id"], json!("[parameters('identity')]"));
        assert_eq!(res[1].unresolved.len(), 2);
        let r = diags
            .iter()
            .find(|d| d.code == UNSUPPORTED_ARM_FUNCTION)
            .expect("reference diag");
        assert_eq!(text(src, r.span), "reference");
        let m = diags
            .iter()
            .find(|d| d.code == MISSING_PARAMETER)
            .expect("missing inner parameter");
        assert!(
            m.message.contains("'none' of the nested template"),
            "{}",
            m.message
        );
        assert_eq!(diags.len(), 2, "{diags:?}");
    }

    #[test]
    fn copy_loops_and_conditions() {
        let src = r#"{"$schema": "x/deploymentTemplate.json#",
          "parameters": {"n": {"type": "int", "defaultValue": 2}, "build": {"type": "bool", "defaultValue": false},
                         "scripts": {"type": "array", "defaultValue": ["a.sh", "b.sh", "c.sh"]}},
          "variables": {"copy": [{"name": "regions", "count": 2, "input": "[concat('region', string(copyIndex('regions', 1)))]"}]},
          "resources": [
            {"type": "Microsoft.VirtualMachineImages/imageTemplates", "name": "[concat('it', copyIndex())]",
             "copy": {"name": "its", "count": "[parameters('n')]"},
             "properties": {"regions": "[variables('regions')]",
               "copy": [{"name": "customize", "count": "[length(parameters('scripts'))]",
                         "input": {"type": "Shell", "scriptUri": "[parameters('scripts')[copyIndex('customize')]]", "resource": "[copyIndex('its')]"}}]}},
            {"type": "Microsoft.VirtualMachineImages/imageTemplates", "name": "skipped", "condition": "[parameters('build')]"}]}"#;
        let (res, diags) = run(src, &[]);
        assert!(diags.is_empty(), "{diags:?}");
        assert_eq!(res.len(), 2);
        let j = res[1].node.to_json();
        assert_eq!(j["name"], json!("it1"));
        assert_eq!(j["properties"]["regions"], json!(["region1", "region2"]));
        assert_eq!(
            j["properties"]["customize"][2],
            json!({"type": "Shell", "scriptUri": "c.sh", "resource": 1})
        );
        assert!(j["properties"].get("copy").is_none());
        let (res, _) = run(src, &[("build", json!(true)), ("n", json!(0))]);
        assert_eq!(res.len(), 1);
        assert_eq!(res[0].node.to_json()["name"], json!("skipped"));
    }

    #[test]
    fn no_image_template_is_reported() {
        let (res, diags) = run(
            r#"{"$schema": "x/deploymentTemplate.json#", "resources": [{"type": "Microsoft.Compute/images", "name": "x"}]}"#,
            &[],
        );
        assert!(res.is_empty());
        assert_eq!(diags.len(), 1);
        assert_eq!(diags[0].code, NO_IMAGE_TEMPLATE);
        let (_, diags) = run(
            r#"{"$schema": "x/deploymentTemplate.json#", "resources": [{"type": "Microsoft.VirtualMachineImages/imageTemplates", "name": "x", "condition": false}]}"#,
            &[],
        );
        assert!(diags[0].message.contains("condition"), "{diags:?}");
        let (_, diags) = run(
            r#"{"$schema": "x/deploymentTemplate.json#", "resources": [{"type": "Microsoft.Resources/deployments", "name": "x", "properties": {"templateLink": {"uri": "u"}}}]}"#,
            &[],
        );
        assert!(diags[0].message.contains("templateLink"), "{diags:?}");
        let (_, diags) = run("[1, 2]", &[]);
        assert_eq!(diags[0].code, ARM_EXPRESSION_ERROR);
    }

    #[test]
    fn subscription_scope() {
        let src = r#"{"$schema": "https://schema.management.azure.com/schemas/2018-05-01/subscriptionDeploymentTemplate.json#",
          "parameters": {"Location": {"type": "string", "defaultValue": "[deployment().location]"}},
          "resources": [{"type": "Microsoft.VirtualMachineImages/imageTemplates", "name": "x", "location": "[parameters('Location')]",
             "properties": {"id": "[resourceId('Microsoft.Compute/images', 'i')]", "rg": "[resourceGroup().name]"}}]}"#;
        let (res, diags) = run(src, &[]);
        let j = res[0].node.to_json();
        assert_eq!(j["location"], json!("westeurope"));
        assert_eq!(
            j["properties"]["id"],
            json!(format!(
                "/subscriptions/{SUB}/providers/Microsoft.Compute/images/i"
            ))
        );
        assert_eq!(diags.len(), 1);
        assert!(
            diags[0]
                .message
                .contains("resourceGroup() is not available"),
            "{diags:?}"
        );
        // deployment().location does not exist at resource-group scope
        let p = probe("[deployment().location]");
        assert!(
            p.diags
                .iter()
                .any(|d| d.message.contains("property 'location' doesn't exist")),
            "{:?}",
            p.diags
        );
    }

    #[test]
    fn user_defined_functions() {
        let src = r#"{"$schema": "x/deploymentTemplate.json#",
          "functions": [{"namespace": "contoso", "members": {"uniqueName": {
              "parameters": [{"name": "namePrefix", "type": "string"}],
              "output": {"type": "string", "value": "[concat(toLower(parameters('namePrefix')), '-', 'x')]"}},
            "leaky": {"parameters": [], "output": {"type": "string", "value": "[parameters('p')]"}}}}],
          "parameters": {"p": {"type": "string", "defaultValue": "P"}},
          "resources": [{"type": "Microsoft.VirtualMachineImages/imageTemplates", "name": "[contoso.uniqueName('ABC')]",
                         "properties": {"l": "[contoso.leaky()]"}}]}"#;
        let (res, diags) = run(src, &[]);
        assert_eq!(res[0].node.to_json()["name"], json!("abc-x"));
        assert!(
            diags
                .iter()
                .any(|d| d.message.contains("not a parameter of this user function")),
            "{diags:?}"
        );
    }

    #[test]
    fn every_problem_is_reported() {
        let src = r#"{"$schema": "x/deploymentTemplate.json#",
          "resources": [{"type": "Microsoft.VirtualMachineImages/imageTemplates", "name": "[badOne()]",
             "properties": {"a": "[reference('r')]", "b": ["[concat('x', ]", "ok"], "c": "[parameters('nope')]"}}]}"#;
        let (res, diags) = run(src, &[]);
        assert_eq!(diags.len(), 4, "{diags:?}");
        assert_eq!(res[0].unresolved.len(), 4);
        assert_eq!(res[0].node.to_json()["properties"]["b"][1], json!("ok"));
    }

    fn assert_fails_fast(src: &str, needle: &str) {
        let start = std::time::Instant::now();
        let root = parse(src).unwrap().root;
        let (res, diags) = evaluate_image_templates(&root, &[], &ctx());
        assert!(start.elapsed().as_secs() < 20, "took {:?}", start.elapsed());
        assert!(
            diags.iter().any(|d| d.message.contains(needle)),
            "want {needle:?} in {:?}",
            diags.iter().map(|d| &d.message).collect::<Vec<_>>()
        );
        assert!(res.iter().all(|r| !r.unresolved.is_empty()));
    }

    fn one_resource(vars: &str, value: &str) -> String {
        format!(
            r#"{{"$schema": "x/deploymentTemplate.json#", "variables": {vars},
              "resources": [{{"type": "Microsoft.VirtualMachineImages/imageTemplates", "name": "x", "properties": {{"v": {value}}}}}]}}"#
        )
    }

    #[test]
    fn hostile_templates_are_bounded() {
        // deeply nested expression
        let deep = format!("\"[{}'a'{}]\"", "concat(".repeat(5000), ")".repeat(5000));
        assert_fails_fast(&one_resource("{}", &deep), "nested deeper than 64");
        // deeply nested index / property chains
        let chain = format!("\"[createObject('a', 1){}]\"", ".a".repeat(2000));
        assert_fails_fast(&one_resource("{}", &chain), "nested deeper than 64");
        // a long chain of variables
        let mut vars = Vec::new();
        for i in 0..3000 {
            vars.push(format!("\"v{i}\": \"[variables('v{}')]\"", i + 1));
        }
        vars.push("\"v3000\": \"end\"".into());
        assert_fails_fast(
            &one_resource(&format!("{{{}}}", vars.join(",")), "\"[variables('v0')]\""),
            "evaluation nested deeper than 128",
        );
        // exponential growth through variables
        let mut vars = vec![
            "\"d0\": \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\""
                .to_string(),
        ];
        for i in 1..36 {
            vars.push(format!(
                "\"d{i}\": \"[concat(variables('d{0}'), variables('d{0}'))]\"",
                i - 1
            ));
        }
        assert_fails_fast(
            &one_resource(&format!("{{{}}}", vars.join(",")), "\"[variables('d35')]\""),
            "longer than 4 MiB",
        );
        let mut vars = vec!["\"d0\": [1, 2]".to_string()];
        for i in 1..36 {
            vars.push(format!(
                "\"d{i}\": \"[createArray(variables('d{0}'), variables('d{0}'))]\"",
                i - 1
            ));
        }
        assert_fails_fast(
            &one_resource(&format!("{{{}}}", vars.join(",")), "\"[variables('d35')]\""),
            "more work than kiln allows",
        );
        // big loops
        assert_fails_fast(
            &one_resource(
                "{}",
                "{\"copy\": [{\"name\": \"c\", \"count\": 1000000, \"input\": 1}]}",
            ),
            "from 0 to 800",
        );
        assert_fails_fast(
            &one_resource(
                "{}",
                "\"[format('{0}{0}{0}{0}{0}{0}{0}{0}', padLeft('', 1000000, 'x'))]\"",
            ),
            "longer than 4 MiB",
        );
        assert_fails_fast(
            &one_resource(
                "{}",
                "\"[replace(padLeft('', 100000, 'x'), 'x', padLeft('', 1000, 'y'))]\"",
            ),
            "longer than 4 MiB",
        );
        // quadratic functions are charged for their comparisons
        assert_fails_fast(
            &one_resource(
                "{}",
                "\"[union(range(0, 10000), range(5000, 10000), range(1, 9999))]\"",
            ),
            "more work than kiln allows",
        );
        assert_fails_fast(
            &one_resource("{}", "\"[split(padLeft('', 4000000, 'x'), map(range(0, 10000), lambda('i', string(lambdaVariables('i')))))]\""),
            "more work than kiln allows",
        );
        // nested lambdas over big ranges stay within the work budget
        let lam = "\"[map(range(0, 10000), lambda('a', map(range(0, 10000), lambda('b', 1))))]\"";
        assert_fails_fast(&one_resource("{}", lam), "more work than kiln allows");
        // deeply nested JSON value that is then nested further
        let nested = format!(
            "\"[createArray(createArray(json('{}1{}')))]\"",
            "[".repeat(127),
            "]".repeat(127)
        );
        let src = one_resource("{}", &nested);
        let root = parse(&src).unwrap().root;
        let _ = evaluate_image_templates(&root, &[], &ctx()); // must not panic
                                                              // deeply nested JSON in a variable and in the resource itself
        let v = format!("{}1{}", "[".repeat(250), "]".repeat(250));
        assert_fails_fast(
            &one_resource(&format!("{{\"a\": {v}}}"), "\"[variables('a')]\""),
            "evaluation nested deeper than 128",
        );
        let root = parse(&one_resource("{}", &v)).unwrap().root;
        let (res, _) = evaluate_image_templates(&root, &[], &ctx());
        assert_eq!(res.len(), 1);
        // a self-referencing user function
        let src = r#"{"$schema": "x/deploymentTemplate.json#",
          "functions": [{"namespace": "f", "members": {"loop": {"parameters": [], "output": {"type": "string", "value": "[f.loop()]"}}}}],
          "resources": [{"type": "Microsoft.VirtualMachineImages/imageTemplates", "name": "[f.loop()]"}]}"#;
        assert_fails_fast(src, "nested deeper than");
    }

    #[test]
    fn unique_string_guid_and_hash_vectors() {
        assert_eq!(unique_string("test"), "rbgf3xv4ufgzg");
        for s in ["", "a", "abcdefg", "abcdefgh", "abcdefghijklm", "é/ü"] {
            let u = unique_string(s);
            assert_eq!(u.len(), 13);
            assert!(
                u.bytes()
                    .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)),
                "{u}"
            );
        }
        assert_ne!(unique_string("ABC"), unique_string("abc"));
        assert_eq!(
            hex(&sha1(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            hex(&sha1(&[b'a'; 1000])),
            "291e9a6c66994949b57ba5e650361e98fc36b1ba"
        );
        assert_eq!(hex(&sha1(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        let rg = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg";
        assert_eq!(
            uuid_v5(&ARM_GUID_NAMESPACE, rg.as_bytes()),
            "9aa66516-21bf-591d-8865-b805a6ac9414"
        );
        assert_eq!(
            uuid_v5(&ARM_GUID_NAMESPACE, "é".as_bytes()),
            "00e3d13f-31a7-5e5b-ac3b-5598870502dd"
        );
        let g = new_guid();
        assert_ne!(g, new_guid());
        assert_eq!(g.len(), 36);
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn encodings_round_trip() {
        for s in [
            "",
            "f",
            "fo",
            "foo",
            "foob",
            "fooba",
            "foobar",
            "héllo wörld",
        ] {
            assert_eq!(
                base64_decode(&base64_encode(s.as_bytes())).unwrap(),
                s.as_bytes()
            );
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert!(base64_decode("not base64!").is_none());
        assert_eq!(uri_unescape(&uri_escape("a b/é%")), "a b/é%");
        assert_eq!(uri_unescape("%zz%4"), "%zz%4");
        assert_eq!(split_any("a--b-c", &["--", "-"]), vec!["a", "b", "c"]);
        assert_eq!(split_any("abc", &[""]), vec!["abc"]);
    }

    #[test]
    fn dates_format_like_dotnet() {
        // 2023-11-14 22:13:20.123456789 UTC, a Tuesday
        let t = utc_from_unix(1_700_000_000, 123_456_789);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second, t.weekday),
            (2023, 11, 14, 22, 13, 20, 2)
        );
        for (fmt, want) in [
            ("yyyyMMddTHHmmssZ", "20231114T221320Z"),
            ("yyyyMMddhhmmss", "20231114101320"),
            ("u", "2023-11-14 22:13:20Z"),
            ("s", "2023-11-14T22:13:20"),
            ("o", "2023-11-14T22:13:20.1234567Z"),
            ("d", "11/14/2023"),
            ("M d", "11 14"),
            (
                "dddd, MMMM d, yyyy h:mm tt",
                "Tuesday, November 14, 2023 10:13 PM",
            ),
            ("'Week' ddd \\y yy", "Week Tue y 23"),
            ("fff FFFF", "123 1234"),
        ] {
            assert_eq!(format_utc(fmt, &t), want, "{fmt}");
        }
        let leap = utc_from_unix(951_782_400, 0); // 2000-02-29
        assert_eq!((leap.year, leap.month, leap.day), (2000, 2, 29));
        let old = utc_from_unix(-86_400, 0);
        assert_eq!(
            (old.year, old.month, old.day, old.weekday),
            (1969, 12, 31, 3)
        );
    }

    #[test]
    fn corpus_arm_wrappers() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/corpus/templates");
        let Ok(entries) = std::fs::read_dir(dir) else {
            panic!("corpus directory {dir} is missing");
        };
        let mut files: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        let mut wrappers = 0;
        for path in files {
            let Ok(src) = std::fs::read_to_string(&path) else {
                continue;
            };
            let Ok(parsed) = parse(&src) else { continue };
            if !is_deployment_template(&parsed.root) {
                continue;
            }
            wrappers += 1;
            let (res, diags) = evaluate_image_templates(&parsed.root, &[], &ctx());
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            assert!(
                !res.is_empty() || !diags.is_empty(),
                "{name}: nothing found and nothing reported"
            );
            for r in &res {
                let ty = r.node.get("type").and_then(Node::as_str).unwrap_or("");
                assert!(ty.eq_ignore_ascii_case(IMAGE_TEMPLATE_TYPE), "{name}: {ty}");
                for s in &r.unresolved {
                    assert!(
                        s.end <= src.len() && s.start < s.end,
                        "{name}: bad span {s:?}"
                    );
                }
            }
            for d in &diags {
                assert!(
                    d.span.end <= src.len() && d.span.start <= d.span.end,
                    "{name}: bad span {:?}",
                    d.span
                );
                assert!(!d.message.is_empty() && !d.fix.is_empty());
            }
            // Every unresolved value is explained by at least one diagnostic.
            if res.iter().any(|r| !r.unresolved.is_empty()) {
                assert!(
                    !diags.is_empty(),
                    "{name}: unresolved values without a diagnostic"
                );
            }
            eprintln!(
                "{name}: {} image template(s), {} unresolved, diags: {:?}",
                res.len(),
                res.iter().map(|r| r.unresolved.len()).sum::<usize>(),
                diags
                    .iter()
                    .map(|d| format!("{}: {}", d.code, truncate(&d.message, 90)))
                    .collect::<Vec<_>>()
            );
        }
        assert!(
            wrappers >= 20,
            "only {wrappers} deployment templates found in {dir}"
        );
    }
}
