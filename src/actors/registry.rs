//! The `SessionRegistry`: finds or starts the session actor of a conversation, and supervises
//! them. A session that fails is forgotten and its streaming message marked interrupted; the
//! next request starts a fresh one from the store, so the conversation stays consistent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{
    Actor, ActorCell, ActorProcessingErr, ActorRef, ActorStatus, RpcReplyPort, SupervisionEvent,
};

use super::model_actor::ModelMsg;
use super::session::{SessionActor, SessionArgs, SessionError, SessionMsg};
use crate::engine::Engine;
use crate::store::{ConversationId, Store, UserId};

pub enum RegistryMsg {
    /// The session of `conversation`, if `owner` owns it; started when needed.
    Open(
        UserId,
        ConversationId,
        RpcReplyPort<Result<ActorRef<SessionMsg>, SessionError>>,
    ),
    /// How many sessions are running.
    Count(RpcReplyPort<usize>),
}

pub struct RegistryArgs {
    pub store: Store,
    pub model: ActorRef<ModelMsg>,
    pub engine: Arc<Engine>,
    /// A session with no subscriber and no generation stops after this long.
    pub idle: Duration,
}

pub struct RegistryState {
    args: RegistryArgs,
    /// Each running session, with the owner it acts for.
    sessions: HashMap<ConversationId, (UserId, ActorRef<SessionMsg>)>,
}

pub struct SessionRegistry;

impl Actor for SessionRegistry {
    type Msg = RegistryMsg;
    type State = RegistryState;
    type Arguments = RegistryArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<RegistryMsg>,
        args: RegistryArgs,
    ) -> Result<RegistryState, ActorProcessingErr> {
        Ok(RegistryState {
            args,
            sessions: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<RegistryMsg>,
        msg: RegistryMsg,
        state: &mut RegistryState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RegistryMsg::Open(owner, conv, reply) => {
                let r = state.open(&myself, owner, conv).await;
                let _ = reply.send(r);
            }
            RegistryMsg::Count(reply) => {
                let _ = reply.send(state.sessions.len());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<RegistryMsg>,
        evt: SupervisionEvent,
        state: &mut RegistryState,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                state.forget(&cell);
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                if let Some(conv) = state.forget(&cell) {
                    tracing::error!(conversation = %conv, error = %err, "session failed; it restarts from the store on next use");
                    if let Err(e) = state.args.store.interrupt_streaming(conv).await {
                        tracing::error!(error = %e, "could not mark the interrupted answer");
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl RegistryState {
    fn forget(&mut self, cell: &ActorCell) -> Option<ConversationId> {
        let conv = self
            .sessions
            .iter()
            .find(|(_, (_, a))| a.get_id() == cell.get_id())
            .map(|(c, _)| *c)?;
        self.sessions.remove(&conv);
        Some(conv)
    }

    async fn open(
        &mut self,
        myself: &ActorRef<RegistryMsg>,
        owner: UserId,
        conv: ConversationId,
    ) -> Result<ActorRef<SessionMsg>, SessionError> {
        // Ownership first: someone else's conversation is answered like a missing one
        // (`StoreError::NotFound` becomes `SessionError::NotFound`).
        self.args.store.conversation(owner, conv).await?;
        if let Some((was_for, a)) = self.sessions.get(&conv) {
            // A session that stopped itself for idleness stays here until its termination
            // reaches us: a new one takes its place rather than handing out a stopping actor
            // (its post_stop has nothing to write, an idle session has no answer running).
            let stopping = matches!(
                a.get_status(),
                ActorStatus::Draining | ActorStatus::Stopping | ActorStatus::Stopped
            );
            if !stopping && *was_for == owner {
                return Ok(a.clone());
            }
            // The conversation changed hands (a browser signed in as someone else brought it
            // along, which the store allows only while no answer is written there): its old
            // session, idle, would act for the old owner.
            if !stopping {
                a.stop(Some("the conversation changed hands".into()));
            }
            self.sessions.remove(&conv);
        }
        let args = SessionArgs {
            conversation: conv,
            owner,
            store: self.args.store.clone(),
            model: self.args.model.clone(),
            engine: self.args.engine.clone(),
            idle: self.args.idle,
        };
        let (actor, _) = Actor::spawn_linked(None, SessionActor, args, myself.get_cell())
            .await
            .map_err(|e| SessionError::Internal {
                message: format!("starting the session: {e}"),
            })?;
        self.sessions.insert(conv, (owner, actor.clone()));
        Ok(actor)
    }
}
