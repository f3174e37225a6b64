//! The phase-checked command registry.
//!
//! A command is a Rust type: its fields are the arguments (serde), [`Command::NAME`] its QMP
//! name, [`Command::PHASES`] where it is valid, and [`Handler::handle`] what it does on some
//! context `C` (the VMM's state; this crate never looks inside it). The registry runs
//! every request the same way: lookup → phase check → argument validation against the
//! declared [`Type`] → typed deserialisation → handler → result. The same path serves typed
//! Rust callers through [`Registry::execute`], so an embedder needs no JSON.

use std::cell::Cell;
use std::collections::BTreeMap;

use keel_phase::{Phase, PhaseSet};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::schema::{Type, opt};
use crate::{CommandError, ErrorClass};

/// Anything that knows the current lifecycle phase.
pub trait PhaseSource {
    /// The current phase.
    fn phase(&self) -> Phase;
}

/// A command's declaration: name, arguments (the implementing type), result, phases.
pub trait Command: DeserializeOwned + 'static {
    /// QMP name, e.g. `query-status`.
    const NAME: &'static str;
    /// Phases in which the command is valid; the dispatcher refuses it elsewhere.
    const PHASES: PhaseSet;
    /// Whether a client may run it with `exec-oob` (QEMU's `allow-oob`). Such a command
    /// may run on a monitor's reader thread while an in-band command of the same client
    /// is still executing, so it must be quick and must not wait for in-band work.
    const ALLOW_OOB: bool = false;
    /// What a successful run returns.
    type Output: Serialize;
    /// The arguments' type (an object type); no arguments by default.
    fn arguments() -> Type {
        Type::empty()
    }
    /// The result's type; `None` means the command returns `{}`.
    fn returns() -> Option<Type> {
        None
    }
    /// An extra sentence for the out-of-phase error in `phase` (e.g. QEMU's wording).
    fn phase_hint(_phase: Phase) -> Option<&'static str> {
        None
    }
}

/// How a command runs on context `C`.
pub trait Handler<C>: Command {
    /// Runs the command; the phase has already been checked.
    fn handle(self, ctx: &mut C, registry: &Registry<C>) -> Result<Self::Output, CommandError>;
}

/// How an out-of-band command runs without any context: it must not need the VMM's state,
/// so that an `exec-oob` request is answered while an in-band command holds that state
/// (QEMU runs such commands on the monitor's I/O thread, outside the big lock).
pub trait ContextFree: Command {
    /// Runs the command; the phase has already been checked.
    fn handle(self) -> Result<Self::Output, CommandError>;
}

type RunFn<C> = fn(&mut C, &Registry<C>, Map<String, Value>) -> Result<Value, CommandError>;
type FreeFn = fn(Map<String, Value>) -> Result<Value, CommandError>;

struct Entry<C> {
    phases: PhaseSet,
    allow_oob: bool,
    arguments: Type,
    returns: Option<Type>,
    hint: fn(Phase) -> Option<&'static str>,
    run: RunFn<C>,
    /// Set for [`ContextFree`] commands: runs without the context.
    free: Option<FreeFn>,
}

/// A command as `query-commands` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CommandInfo {
    /// QMP name.
    pub name: String,
    /// Phases in which it is valid.
    pub phases: Vec<Phase>,
}

/// Commands (and event declarations) for one kind of context.
pub struct Registry<C> {
    commands: BTreeMap<&'static str, Entry<C>>,
    events: BTreeMap<&'static str, Option<Type>>,
}

impl<C> std::fmt::Debug for Registry<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("commands", &self.commands.keys().collect::<Vec<_>>())
            .field("events", &self.events.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Arguments of `qmp_capabilities`: `{"enable"?: ["oob", ...]}`.
pub fn capabilities_arguments() -> Type {
    Type::object(
        "q_obj_qmp_capabilities-arg",
        vec![opt(
            "enable",
            Type::array(Type::Enum {
                name: "QMPCapability",
                values: &["oob"],
            }),
        )],
    )
}

fn run_entry<C, K: Handler<C>>(
    ctx: &mut C,
    reg: &Registry<C>,
    args: Map<String, Value>,
) -> Result<Value, CommandError> {
    let out = parse::<K>(args)?.handle(ctx, reg)?;
    to_reply::<K>(out)
}

fn run_free<K: ContextFree>(args: Map<String, Value>) -> Result<Value, CommandError> {
    to_reply::<K>(ContextFree::handle(parse::<K>(args)?)?)
}

fn run_free_in_band<C, K: ContextFree>(
    _: &mut C,
    _: &Registry<C>,
    args: Map<String, Value>,
) -> Result<Value, CommandError> {
    run_free::<K>(args)
}

fn parse<K: Command>(args: Map<String, Value>) -> Result<K, CommandError> {
    serde_json::from_value(Value::Object(args))
        .map_err(|e| CommandError::generic(format!("Invalid arguments for '{}': {e}", K::NAME)))
}

fn to_reply<K: Command>(out: K::Output) -> Result<Value, CommandError> {
    if K::returns().is_none() {
        return Ok(Value::Object(Map::new()));
    }
    serde_json::to_value(out)
        .map_err(|e| CommandError::generic(format!("'{}' produced no JSON result: {e}", K::NAME)))
}

fn capabilities_complete<C>(
    _: &mut C,
    _: &Registry<C>,
    _: Map<String, Value>,
) -> Result<Value, CommandError> {
    Err(CommandError::with_class(
        ErrorClass::CommandNotFound,
        "Capabilities negotiation is already complete, command ignored",
    ))
}

fn no_hint(_: Phase) -> Option<&'static str> {
    None
}

thread_local! {
    /// Set while this thread runs an `exec-oob` request (see [`run_out_of_band`]).
    static OUT_OF_BAND: Cell<bool> = const { Cell::new(false) };
}

/// Whether the current thread is running an `exec-oob` request. [`Registry::dispatch`]
/// consults it; a [`crate::Dispatcher`] not built on a registry should too.
pub fn executing_out_of_band() -> bool {
    OUT_OF_BAND.with(Cell::get)
}

/// Runs `f` marked as out-of-band: a [`Registry::dispatch`] inside it refuses commands
/// not declared [`Command::ALLOW_OOB`] with QEMU's "does not support OOB" error. The
/// mark is restored afterwards, also if `f` unwinds.
pub fn run_out_of_band<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            OUT_OF_BAND.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(OUT_OF_BAND.with(|c| c.replace(true)));
    f()
}

impl<C: PhaseSource> Default for Registry<C> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C: PhaseSource> Registry<C> {
    /// A registry holding only `qmp_capabilities`, which in command mode answers QEMU's
    /// "already complete" error (negotiation itself is the session's business).
    pub fn new() -> Self {
        let mut r = Registry {
            commands: BTreeMap::new(),
            events: BTreeMap::new(),
        };
        r.commands.insert(
            "qmp_capabilities",
            Entry {
                phases: PhaseSet::ANY,
                allow_oob: false,
                arguments: capabilities_arguments(),
                returns: None,
                hint: no_hint,
                run: capabilities_complete::<C>,
                free: None,
            },
        );
        r
    }

    /// Registers command `K` under its name.
    pub fn register<K: Handler<C>>(&mut self) {
        self.register_as::<K>(K::NAME);
    }

    /// Registers command `K` under another name too (QEMU's `x-exit-preconfig` for
    /// `machine-done`).
    pub fn register_as<K: Handler<C>>(&mut self, name: &'static str) {
        self.commands.insert(
            name,
            Entry {
                phases: K::PHASES,
                allow_oob: K::ALLOW_OOB,
                arguments: K::arguments(),
                returns: K::returns(),
                hint: K::phase_hint,
                run: run_entry::<C, K>,
                free: None,
            },
        );
    }

    /// Registers a command that needs no context (see [`ContextFree`]): in band it runs
    /// like any other, and [`Registry::dispatch_context_free`] runs it without the context.
    pub fn register_context_free<K: ContextFree>(&mut self) {
        self.commands.insert(
            K::NAME,
            Entry {
                phases: K::PHASES,
                allow_oob: K::ALLOW_OOB,
                arguments: K::arguments(),
                returns: K::returns(),
                hint: K::phase_hint,
                run: run_free_in_band::<C, K>,
                free: Some(run_free::<K>),
            },
        );
    }

    /// Whether `name` is a [`ContextFree`] command, which
    /// [`Registry::dispatch_context_free`] runs without the context.
    pub fn is_context_free(&self, name: &str) -> bool {
        self.commands.get(name).is_some_and(|e| e.free.is_some())
    }

    /// Runs a request without the context if its command is [`ContextFree`], in the same
    /// order as [`Registry::dispatch`] (OOB permission, phase check against `phase`,
    /// arguments, handler). `None`: the command needs the context (or does not exist); the
    /// caller then takes whatever lock guards it and uses [`Registry::dispatch`].
    pub fn dispatch_context_free(
        &self,
        phase: Phase,
        name: &str,
        args: Map<String, Value>,
    ) -> Option<Result<Value, CommandError>> {
        let entry = self.commands.get(name)?;
        let free = entry.free?;
        Some(Self::admit(entry, name, phase, &args).and_then(|()| free(args)))
    }

    /// The checks before a handler runs, in QEMU's order: OOB permission (inside
    /// [`run_out_of_band`]), phase, arguments.
    fn admit(
        entry: &Entry<C>,
        name: &str,
        phase: Phase,
        args: &Map<String, Value>,
    ) -> Result<(), CommandError> {
        if !entry.allow_oob && executing_out_of_band() {
            return Err(CommandError::generic(format!(
                "The command {name} does not support OOB"
            )));
        }
        Self::phase_check(name, entry.phases, entry.hint, phase)?;
        entry.arguments.validate_members(args, "")
    }

    /// Declares an event and the type of its `data` (for `query-qmp-schema`).
    pub fn declare_event(&mut self, name: &'static str, data: Option<Type>) {
        self.events.insert(name, data);
    }

    /// Whether a command of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.commands.contains_key(name)
    }

    fn phase_check(
        name: &str,
        phases: PhaseSet,
        hint: fn(Phase) -> Option<&'static str>,
        phase: Phase,
    ) -> Result<(), CommandError> {
        if phases.contains(phase) {
            Ok(())
        } else {
            Err(CommandError::OutOfPhase {
                command: name.to_owned(),
                phase,
                needs: phases,
                hint: hint(phase),
            })
        }
    }

    /// Whether a command may run with `exec-oob`; `None` if there is no such command.
    pub fn allows_oob(&self, name: &str) -> Option<bool> {
        self.commands.get(name).map(|e| e.allow_oob)
    }

    /// Runs a request given as JSON in QEMU's order: lookup, OOB permission (when called
    /// inside [`run_out_of_band`]), phase check, argument validation, handler.
    pub fn dispatch(
        &self,
        ctx: &mut C,
        name: &str,
        args: Map<String, Value>,
    ) -> Result<Value, CommandError> {
        let entry = self
            .commands
            .get(name)
            .ok_or_else(|| CommandError::CommandNotFound(name.to_owned()))?;
        Self::admit(entry, name, ctx.phase(), &args)?;
        (entry.run)(ctx, self, args)
    }

    /// The answer [`Registry::dispatch`] gives an `exec-oob` request before it needs the
    /// context: `CommandNotFound`, or "does not support OOB" for a command not declared
    /// [`Command::ALLOW_OOB`]. `None` if the request gets past those checks. A dispatcher
    /// that serialises commands behind a lock calls it first, so refused `exec-oob`
    /// requests never wait for that lock.
    pub fn refuse_out_of_band(&self, name: &str) -> Option<CommandError> {
        match self.commands.get(name) {
            None => Some(CommandError::CommandNotFound(name.to_owned())),
            Some(e) if !e.allow_oob => Some(CommandError::generic(format!(
                "The command {name} does not support OOB"
            ))),
            Some(_) => None,
        }
    }

    /// Runs a typed command: phase check, then its handler. Nothing changes if the phase
    /// is wrong.
    pub fn execute<K: Handler<C>>(&self, ctx: &mut C, cmd: K) -> Result<K::Output, CommandError> {
        Self::phase_check(K::NAME, K::PHASES, K::phase_hint, ctx.phase())?;
        cmd.handle(ctx, self)
    }

    /// Every command with its phases, sorted by name (`query-commands`).
    pub fn commands(&self) -> Vec<CommandInfo> {
        self.commands
            .iter()
            .map(|(name, e)| CommandInfo {
                name: (*name).to_owned(),
                phases: e.phases.iter().collect(),
            })
            .collect()
    }

    /// The phases a command is valid in.
    pub fn phases_of(&self, name: &str) -> Option<PhaseSet> {
        self.commands.get(name).map(|e| e.phases)
    }

    /// `query-qmp-schema`: SchemaInfo for every command and event and each type they use.
    pub fn schema(&self) -> Vec<Value> {
        let mut types = BTreeMap::new();
        let mut entities = Vec::new();
        let empty = Type::empty();
        for (name, e) in &self.commands {
            let ret = e.returns.clone().unwrap_or_else(Type::empty);
            let mut info = json!({
                "name": name,
                "meta-type": "command",
                "arg-type": e.arguments.name(),
                "ret-type": ret.name(),
            });
            // SchemaInfoCommand's `*allow-oob` is present only when true, as in QEMU.
            if e.allow_oob
                && let Some(m) = info.as_object_mut()
            {
                m.insert("allow-oob".into(), Value::Bool(true));
            }
            entities.push(info);
            e.arguments.collect_schema(&mut types);
            ret.collect_schema(&mut types);
        }
        for (name, data) in &self.events {
            let data = data.as_ref().unwrap_or(&empty);
            entities.push(json!({"name": name, "meta-type": "event", "arg-type": data.name()}));
            data.collect_schema(&mut types);
        }
        entities.extend(types.into_values());
        entities
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::req;
    use serde::Deserialize;

    struct Ctx {
        phase: Phase,
        hits: u32,
    }
    impl PhaseSource for Ctx {
        fn phase(&self) -> Phase {
            self.phase
        }
    }

    #[derive(Deserialize)]
    struct Bump {
        by: u32,
    }
    impl Command for Bump {
        const NAME: &'static str = "bump";
        const PHASES: PhaseSet = PhaseSet::from(Phase::MachineInit);
        type Output = u32;
        fn arguments() -> Type {
            Type::object("q_obj_bump-arg", vec![req("by", Type::int())])
        }
        fn returns() -> Option<Type> {
            Some(Type::int())
        }
    }
    impl Handler<Ctx> for Bump {
        fn handle(self, ctx: &mut Ctx, _: &Registry<Ctx>) -> Result<u32, CommandError> {
            ctx.hits += self.by;
            Ok(ctx.hits)
        }
    }

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn phase_is_enforced_before_arguments() {
        let mut reg = Registry::<Ctx>::new();
        reg.register::<Bump>();
        let mut ctx = Ctx {
            phase: Phase::AccelCreated,
            hits: 0,
        };
        let e = reg.dispatch(&mut ctx, "bump", args(json!({}))).unwrap_err();
        assert_eq!(e.class(), ErrorClass::OutOfPhase);
        assert_eq!(
            e.to_string(),
            "'bump' is not allowed in phase accel-created: it needs machine-init or machine-ready"
        );
        assert_eq!(ctx.hits, 0);
        ctx.phase = Phase::MachineInit;
        let e = reg.dispatch(&mut ctx, "bump", args(json!({}))).unwrap_err();
        assert_eq!(e.to_string(), "Parameter 'by' is missing");
        assert_eq!(
            reg.dispatch(&mut ctx, "bump", args(json!({"by": 2}))),
            Ok(json!(2))
        );
        assert_eq!(reg.execute(&mut ctx, Bump { by: 3 }), Ok(5));
        let e = reg.dispatch(&mut ctx, "nope", Map::new()).unwrap_err();
        assert_eq!(e.class(), ErrorClass::CommandNotFound);
        assert_eq!(e.to_string(), "The command nope has not been found");
    }

    #[test]
    fn introspection() {
        let mut reg = Registry::<Ctx>::new();
        reg.register::<Bump>();
        reg.declare_event("BUMPED", None);
        let cmds = reg.commands();
        assert_eq!(cmds[0].name, "bump");
        assert_eq!(
            cmds[0].phases,
            vec![Phase::MachineInit, Phase::MachineReady]
        );
        let schema = reg.schema();
        let names: Vec<&str> = schema.iter().map(|s| s["name"].as_str().unwrap()).collect();
        assert!(names.contains(&"bump"));
        assert!(names.contains(&"BUMPED"));
        assert!(names.contains(&"q_obj_bump-arg"));
        assert!(names.contains(&"int"));
        assert!(names.contains(&"q_empty"));
    }

    #[derive(Deserialize)]
    struct Peek {}
    impl Command for Peek {
        const NAME: &'static str = "peek";
        const PHASES: PhaseSet = PhaseSet::ANY;
        const ALLOW_OOB: bool = true;
        type Output = u32;
        fn returns() -> Option<Type> {
            Some(Type::int())
        }
    }
    impl Handler<Ctx> for Peek {
        fn handle(self, ctx: &mut Ctx, _: &Registry<Ctx>) -> Result<u32, CommandError> {
            Ok(ctx.hits)
        }
    }

    /// Echoes its argument; needs no context. OOB-capable only in ready machines.
    #[derive(Deserialize)]
    struct Echo {
        v: u32,
    }
    impl Command for Echo {
        const NAME: &'static str = "echo";
        const PHASES: PhaseSet = PhaseSet::from(Phase::MachineReady);
        const ALLOW_OOB: bool = true;
        type Output = u32;
        fn arguments() -> Type {
            Type::object("q_obj_echo-arg", vec![req("v", Type::int())])
        }
        fn returns() -> Option<Type> {
            Some(Type::int())
        }
    }
    impl ContextFree for Echo {
        fn handle(self) -> Result<u32, CommandError> {
            Ok(self.v)
        }
    }

    #[test]
    fn context_free_commands_run_with_or_without_the_context() {
        let mut reg = Registry::<Ctx>::new();
        reg.register::<Bump>();
        reg.register_context_free::<Echo>();
        let ready = Phase::MachineReady;
        // Without the context, with the same checks as dispatch.
        assert_eq!(
            reg.dispatch_context_free(ready, "echo", args(json!({"v": 7}))),
            Some(Ok(json!(7)))
        );
        let e = reg
            .dispatch_context_free(Phase::MachineInit, "echo", args(json!({"v": 7})))
            .unwrap()
            .unwrap_err();
        assert_eq!(e.class(), ErrorClass::OutOfPhase);
        let e = reg
            .dispatch_context_free(ready, "echo", Map::new())
            .unwrap()
            .unwrap_err();
        assert_eq!(e.to_string(), "Parameter 'v' is missing");
        assert!(
            run_out_of_band(|| reg.dispatch_context_free(ready, "echo", args(json!({"v": 1}))))
                .is_some_and(|r| r == Ok(json!(1)))
        );
        // Commands that need the context, and unknown ones, are the caller's.
        assert!(
            reg.dispatch_context_free(ready, "bump", Map::new())
                .is_none()
        );
        assert!(
            reg.dispatch_context_free(ready, "nope", Map::new())
                .is_none()
        );
        // In band it is an ordinary command.
        let mut ctx = Ctx {
            phase: ready,
            hits: 0,
        };
        assert_eq!(
            reg.dispatch(&mut ctx, "echo", args(json!({"v": 3}))),
            Ok(json!(3))
        );
        assert_eq!(reg.allows_oob("echo"), Some(true));
    }

    #[test]
    fn out_of_band_permission() {
        let mut reg = Registry::<Ctx>::new();
        reg.register::<Bump>();
        reg.register::<Peek>();
        let mut ctx = Ctx {
            phase: Phase::AccelCreated,
            hits: 0,
        };
        assert_eq!(reg.allows_oob("peek"), Some(true));
        assert_eq!(reg.allows_oob("bump"), Some(false));
        assert_eq!(reg.allows_oob("qmp_capabilities"), Some(false));
        assert_eq!(reg.allows_oob("nope"), None);
        run_out_of_band(|| {
            assert!(executing_out_of_band());
            assert_eq!(reg.dispatch(&mut ctx, "peek", Map::new()), Ok(json!(0)));
            // QEMU's order: lookup, then OOB permission, then the phase.
            let e = reg.dispatch(&mut ctx, "bump", Map::new()).unwrap_err();
            assert_eq!(e.to_string(), "The command bump does not support OOB");
            let e = reg.dispatch(&mut ctx, "nope", Map::new()).unwrap_err();
            assert_eq!(e.class(), ErrorClass::CommandNotFound);
        });
        assert!(!executing_out_of_band());
        let schema = reg.schema();
        let find = |n: &str| schema.iter().find(|s| s["name"] == n).unwrap().clone();
        assert_eq!(find("peek")["allow-oob"], json!(true));
        assert!(find("bump").get("allow-oob").is_none());
    }
}
