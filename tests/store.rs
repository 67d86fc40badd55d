//! The store on a real SQLite file: branches, recovery, search, and that no user can read or
//! change another's conversation through any store function.

mod common;

use std::path::PathBuf;

use sqlx::Connection;

use common::{read_only, rows_in};

use smolchat::store::{
    BackupError, ConversationId, ConversationPatch, ListCursor, Message, MessageOutcome,
    MessageStatus, Redeemer, Role, Settings, Store, StoreError, UserId,
};

fn db_path(name: &str) -> PathBuf {
    common::scratch(&format!("store-{name}")).join("smolchat.db")
}

/// A first question in `conv`, and its answer still being written: `partial` so far.
async fn answering(
    store: &Store,
    user: UserId,
    conv: ConversationId,
    question: &str,
    partial: &str,
) -> (Message, Message) {
    let q = store
        .add_message(
            user,
            conv,
            None,
            Role::User,
            question,
            MessageStatus::Complete,
        )
        .await
        .unwrap();
    let a = store
        .add_message(
            user,
            conv,
            Some(q.id),
            Role::Assistant,
            "",
            MessageStatus::Streaming,
        )
        .await
        .unwrap();
    store
        .checkpoint_message(user, a.id, partial, "")
        .await
        .unwrap();
    (q, a)
}

#[tokio::test]
async fn branches_titles_and_recovery() {
    let path = db_path("branches");
    let store = Store::open(&path).await.unwrap();
    let alice = store.create_user().await.unwrap();
    let c = store
        .create_conversation(alice, "", "Be brief.", &Settings::default(), false)
        .await
        .unwrap();
    let (u1, a1) = answering(
        &store,
        alice,
        c.id,
        "Where do owls live?\nAnd why?",
        "In forests",
    )
    .await;
    // A streaming answer is not indexed yet (its checkpoints would re-index it every time).
    assert!(store.search(alice, "forests").await.unwrap().is_empty());
    let conv = store.conversation(alice, c.id).await.unwrap();
    assert_eq!(
        conv.title, "Where do owls live?",
        "titled from the first user message"
    );
    assert_eq!(conv.current_leaf_id, Some(a1.id));

    // A regenerate is a sibling under the same user message.
    let a2 = store
        .add_message(
            alice,
            c.id,
            Some(u1.id),
            Role::Assistant,
            "In barns",
            MessageStatus::Complete,
        )
        .await
        .unwrap();
    let kids = store.children(alice, c.id, Some(u1.id)).await.unwrap();
    assert_eq!(kids, vec![a1.id, a2.id]);
    let branch = store.branch(alice, c.id, None).await.unwrap();
    assert_eq!(
        branch.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![u1.id, a2.id]
    );
    // The old branch stays readable.
    let old = store.branch(alice, c.id, Some(a1.id)).await.unwrap();
    assert_eq!(old.last().unwrap().content, "In forests");
    store.select_branch(alice, c.id, a1.id).await.unwrap();
    assert_eq!(
        store
            .conversation(alice, c.id)
            .await
            .unwrap()
            .current_leaf_id,
        Some(a1.id)
    );
    // A follow-up under the first answer: choosing a version shows its newest descendant.
    let u2 = store
        .add_message(
            alice,
            c.id,
            Some(a1.id),
            Role::User,
            "And owlets?",
            MessageStatus::Complete,
        )
        .await
        .unwrap();
    let a3 = store
        .add_message(
            alice,
            c.id,
            Some(u2.id),
            Role::Assistant,
            "Nests",
            MessageStatus::Complete,
        )
        .await
        .unwrap();
    let leaf = |id| {
        let store = store.clone();
        async move {
            store
                .select_branch(alice, c.id, id)
                .await
                .unwrap()
                .current_leaf_id
        }
    };
    assert_eq!(
        leaf(u1.id).await,
        Some(a2.id),
        "the newest answer under the question"
    );
    assert_eq!(leaf(a1.id).await, Some(a3.id), "down the whole follow-up");
    let branch = store.branch(alice, c.id, None).await.unwrap();
    assert_eq!(
        branch.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![u1.id, a1.id, u2.id, a3.id]
    );
    let siblings = store.siblings(alice, c.id, &branch).await.unwrap();
    assert_eq!(siblings.len(), 1, "only the answer has other versions");
    assert_eq!(siblings[&a1.id], vec![a1.id, a2.id]);
    // A message of another conversation is no branch of this one, and changes nothing.
    let other = store
        .create_conversation(alice, "", "", &Settings::default(), false)
        .await
        .unwrap();
    assert!(matches!(
        store.select_branch(alice, other.id, a1.id).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(
        store
            .conversation(alice, c.id)
            .await
            .unwrap()
            .current_leaf_id,
        Some(a3.id)
    );

    // A restart finds the streaming message interrupted, its text kept.
    drop(store);
    let store = Store::open(&path).await.unwrap();
    let m = store.message(alice, a1.id).await.unwrap();
    assert_eq!(m.status, MessageStatus::Interrupted);
    assert_eq!(m.content, "In forests");
    // Once it stops streaming it is found.
    let hits = store.search(alice, "forests").await.unwrap();
    assert_eq!(
        hits.iter().map(|h| h.message_id).collect::<Vec<_>>(),
        vec![a1.id]
    );
    assert_eq!(
        store.message(alice, u1.id).await.unwrap().content,
        "Where do owls live?\nAnd why?"
    );
}

#[tokio::test]
async fn another_user_can_neither_read_nor_change() {
    let store = Store::open(&db_path("isolation")).await.unwrap();
    let alice = store.create_user().await.unwrap();
    let mallory = store.create_user().await.unwrap();
    let c = store
        .create_conversation(alice, "secret plans", "", &Settings::default(), false)
        .await
        .unwrap();
    let u = store
        .add_message(
            alice,
            c.id,
            None,
            Role::User,
            "my secret is blue",
            MessageStatus::Complete,
        )
        .await
        .unwrap();
    let nf = |r: Result<(), StoreError>| assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");

    nf(store.conversation(mallory, c.id).await.map(|_| ()));
    nf(store.branch(mallory, c.id, None).await.map(|_| ()));
    nf(store.children(mallory, c.id, None).await.map(|_| ()));
    nf(store.siblings(mallory, c.id, &[]).await.map(|_| ()));
    nf(store.select_branch(mallory, c.id, u.id).await.map(|_| ()));
    nf(store.message(mallory, u.id).await.map(|_| ()));
    nf(store
        .update_conversation(
            mallory,
            c.id,
            &ConversationPatch {
                title: Some("mine".into()),
                ..Default::default()
            },
        )
        .await
        .map(|_| ()));
    nf(store.delete_conversation(mallory, c.id).await);
    nf(store
        .add_message(
            mallory,
            c.id,
            Some(u.id),
            Role::User,
            "hi",
            MessageStatus::Complete,
        )
        .await
        .map(|_| ()));
    nf(store
        .checkpoint_message(mallory, u.id, "overwritten", "")
        .await);
    nf(store
        .finish_message(mallory, u.id, "overwritten", "", &MessageOutcome::default())
        .await);
    nf(store.select_branch(mallory, c.id, u.id).await.map(|_| ()));
    assert!(store.list_conversations(mallory).await.unwrap().is_empty());
    assert!(store.search(mallory, "secret").await.unwrap().is_empty());

    // Nothing changed for Alice.
    let conv = store.conversation(alice, c.id).await.unwrap();
    assert_eq!(conv.title, "secret plans");
    assert_eq!(
        store.message(alice, u.id).await.unwrap().content,
        "my secret is blue"
    );
    let hits = store.search(alice, "secret").await.unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].message_id, u.id);
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let store = Store::open(&db_path("bad")).await.unwrap();
    let alice = store.create_user().await.unwrap();
    let c = store
        .create_conversation(alice, "t", "", &Settings::default(), false)
        .await
        .unwrap();
    let r = store
        .add_message(
            alice,
            c.id,
            None,
            Role::User,
            "nul\0byte",
            MessageStatus::Complete,
        )
        .await;
    assert!(matches!(r, Err(StoreError::Invalid(_))));
    let bad = Settings {
        temperature: 9.0,
        ..Settings::default()
    };
    assert!(matches!(
        store.create_conversation(alice, "", "", &bad, false).await,
        Err(StoreError::Invalid(_))
    ));
    // Search syntax from users is plain text, never an FTS5 error.
    assert!(store
        .search(alice, "\"unbalanced AND OR ( *")
        .await
        .unwrap()
        .is_empty());
    assert!(store.branch(alice, c.id, None).await.unwrap().is_empty());
    // Tokens are stored hashed and map back to their user.
    let token = store.create_login(alice).await.unwrap();
    assert_eq!(store.user_for_token(&token).await.unwrap(), Some(alice));
    assert_eq!(store.user_for_token("nope").await.unwrap(), None);
}

#[tokio::test]
async fn a_title_made_from_a_long_first_message_can_be_given_again() {
    let store = Store::open(&db_path("title")).await.unwrap();
    let u = store.create_user().await.unwrap();
    let c = store
        .create_conversation(u, "", "", &Settings::default(), false)
        .await
        .unwrap();
    // 70 four-byte characters: 60 of them would be 240 bytes, over the 200 a title may have.
    let text = "🦊".repeat(70);
    store
        .add_message(u, c.id, None, Role::User, &text, MessageStatus::Complete)
        .await
        .unwrap();
    let title = store.conversation(u, c.id).await.unwrap().title;
    assert!(title.starts_with("🦊") && title.ends_with('…'), "{title}");
    assert!(title.len() <= 200, "{} bytes", title.len());
    let patch = ConversationPatch {
        title: Some(title.clone()),
        ..Default::default()
    };
    store.update_conversation(u, c.id, &patch).await.unwrap();
    assert_eq!(store.conversation(u, c.id).await.unwrap().title, title);
}

/// A visitor token for `body` ("<user id>.<nonce>") made with the key in the database, as
/// someone who stole a copy of it could.
async fn made_with_the_key(path: &std::path::Path, body: &str) -> String {
    use hmac::{Hmac, Mac};
    let key: Vec<u8> = sqlx::query_scalar("SELECT value FROM server_keys WHERE name = 'visitor'")
        .fetch_one(&mut read_only(path).await)
        .await
        .unwrap();
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&key).unwrap();
    mac.update(body.as_bytes());
    let sig: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("v1.{body}.{sig}")
}

#[tokio::test]
async fn a_visitor_is_stored_with_their_first_conversation_and_their_token_cannot_be_forged() {
    let path = db_path("visitor");
    let store = Store::open(&path).await.unwrap().with_max_conversations(2);
    let (alice, token) = store.new_visitor();
    let (bob, bobs) = store.new_visitor();
    assert_ne!(alice, bob);
    assert_eq!(store.user_for_token(&token).await.unwrap(), Some(alice));
    assert_eq!(
        rows_in(&path, "users").await,
        0,
        "a visitor alone stores nothing"
    );
    assert!(store.list_conversations(alice).await.unwrap().is_empty());

    // Tokens that are not the server's: another id under Alice's signature, Bob's id under
    // Alice's, Alice's under Bob's, one changed digit, a cut signature, none, not hex, a
    // doubled dot, a prefix alone.
    let (body, sig) = token.rsplit_once('.').unwrap();
    let nonce = body.rsplit_once('.').unwrap().1;
    let (_, bob_sig) = bobs.rsplit_once('.').unwrap();
    let flipped = format!(
        "{body}.{}{}",
        if sig.starts_with('0') { '1' } else { '0' },
        &sig[1..]
    );
    let forged = [
        format!("v1.{}.{nonce}.{sig}", smolchat::store::UserId::new()),
        format!("v1.{bob}.{nonce}.{sig}"),
        format!("{body}.{bob_sig}"),
        flipped,
        format!("{body}.{}", &sig[..32]),
        body.to_owned(),
        format!("{body}.{}", "zz".repeat(32)),
        format!("{body}..{sig}"),
        "v1.".to_owned(),
    ];
    for f in &forged {
        assert_eq!(store.user_for_token(f).await.unwrap(), None, "{f}");
    }

    // Refused conversations store no one: one with a bad title, one for a visitor whose token
    // does not come along (no such user yet), one with another visitor's token.
    let bad = store
        .create_conversation_for(Some(&token), alice, "a\0b", "", &Settings::default(), false)
        .await;
    assert!(matches!(bad, Err(StoreError::Invalid(_))), "{bad:?}");
    let tokenless = store
        .create_conversation(alice, "", "", &Settings::default(), false)
        .await;
    assert!(tokenless.is_err(), "{tokenless:?}");
    let with_bobs = store
        .create_conversation_for(Some(&bobs), alice, "", "", &Settings::default(), false)
        .await;
    assert!(with_bobs.is_err(), "{with_bobs:?}");
    assert_eq!(rows_in(&path, "users").await, 0);

    let first = store
        .create_conversation_for(Some(&token), alice, "one", "", &Settings::default(), false)
        .await
        .unwrap();
    assert_eq!(
        rows_in(&path, "users").await,
        1,
        "stored with the first conversation"
    );
    assert_eq!(rows_in(&path, "login_sessions").await, 1);
    assert_eq!(store.user_for_token(&token).await.unwrap(), Some(alice));
    // A stolen key makes tokens, but for a stored user only their own login counts.
    let other_nonce = format!("{alice}.{}", "ab".repeat(16));
    let made = made_with_the_key(&path, &other_nonce).await;
    assert_eq!(store.user_for_token(&made).await.unwrap(), None);
    store
        .create_conversation_for(Some(&token), alice, "two", "", &Settings::default(), false)
        .await
        .unwrap();
    assert_eq!(rows_in(&path, "login_sessions").await, 1, "stored once");
    let third = store
        .create_conversation_for(
            Some(&token),
            alice,
            "three",
            "",
            &Settings::default(),
            false,
        )
        .await;
    assert!(
        matches!(third, Err(StoreError::TooManyConversations(2))),
        "{third:?}"
    );
    assert_eq!(store.list_conversations(alice).await.unwrap().len(), 2);
    // The limit is per user; deleting one makes room again.
    store
        .create_conversation_for(Some(&bobs), bob, "", "", &Settings::default(), false)
        .await
        .unwrap();
    store.delete_conversation(alice, first.id).await.unwrap();
    store
        .create_conversation(alice, "three", "", &Settings::default(), false)
        .await
        .unwrap();
    assert_eq!(rows_in(&path, "users").await, 2);
    drop(store);

    // The key is kept: after a restart the same token is the same user, and forgeries stay out.
    let store = Store::open(&path).await.unwrap();
    assert_eq!(store.user_for_token(&token).await.unwrap(), Some(alice));
    assert_eq!(store.list_conversations(alice).await.unwrap().len(), 2);
    for f in forged.iter().chain([&made]) {
        assert_eq!(store.user_for_token(f).await.unwrap(), None, "{f}");
    }
    // Another database has another key: Alice's token means nothing there.
    let other = Store::open(&db_path("visitor-other")).await.unwrap();
    assert_eq!(other.user_for_token(&token).await.unwrap(), None);
}

#[tokio::test]
async fn a_link_code_signs_another_browser_in_once_and_brings_its_conversations_along() {
    let path = db_path("links");
    let store = Store::open(&path).await.unwrap().with_max_conversations(3);
    let new_conversation = |owner| {
        let store = store.clone();
        async move {
            store
                .create_conversation(owner, "", "", &Settings::default(), false)
                .await
                .unwrap()
        }
    };
    // A visitor who has stored nothing has nothing to take along.
    let (visitor, _) = store.new_visitor();
    assert!(matches!(
        store.create_link_code(visitor).await,
        Err(StoreError::NotFound)
    ));
    let alice = store.create_user().await.unwrap();
    new_conversation(alice).await;
    // One code at a time: a new one replaces the last.
    let old = store.create_link_code(alice).await.unwrap();
    let code = store.create_link_code(alice).await.unwrap();
    for bad in ["", "nope", &code[..63], &code.to_uppercase(), &old] {
        assert!(
            matches!(
                store.redeem_link_code(bad, None, false).await,
                Err(StoreError::BadLinkCode)
            ),
            "{bad:?}"
        );
    }
    assert_eq!(rows_in(&path, "link_codes").await, 1);
    // A fresh browser gets a login of Alice's own, and the code is used up.
    let (fresh, fresh_token) = store.new_visitor();
    let by = Redeemer {
        user: fresh,
        token: &fresh_token,
    };
    let (user, token) = store
        .redeem_link_code(&code, Some(by), false)
        .await
        .unwrap();
    assert_eq!(user, alice);
    assert_eq!(store.user_for_token(&token).await.unwrap(), Some(alice));
    assert!(matches!(
        store.redeem_link_code(&code, None, false).await,
        Err(StoreError::BadLinkCode)
    ));

    // Carol uses two browsers; in this one she has a conversation, with an answer being
    // written.
    let carol = store.create_user().await.unwrap();
    let carols_browser = store.create_login(carol).await.unwrap();
    let carols_phone = store.create_login(carol).await.unwrap();
    let by = Some(Redeemer {
        user: carol,
        token: &carols_browser,
    });
    let mine = new_conversation(carol).await;
    let answer = store
        .add_message(
            carol,
            mine.id,
            None,
            Role::Assistant,
            "Teal",
            MessageStatus::Streaming,
        )
        .await
        .unwrap();
    let code = store.create_link_code(alice).await.unwrap();
    let before = (
        rows_in(&path, "users").await,
        rows_in(&path, "login_sessions").await,
    );
    // Refused, each time changing nothing and keeping the code good: it would hide Carol's
    // conversation; an answer is being written; Alice's limit (3) would be passed.
    assert!(matches!(
        store.redeem_link_code(&code, by, false).await,
        Err(StoreError::WouldHide(1))
    ));
    // (That refusal comes after the server's hold was taken, and the hold is let go.)
    struct Held<'a>(&'a std::cell::Cell<usize>);
    impl Drop for Held<'_> {
        fn drop(&mut self) {
            self.0.set(self.0.get() + 1);
        }
    }
    let released = std::cell::Cell::new(0);
    assert!(matches!(
        store
            .redeem_link_code_holding(&code, by, true, |_| Ok(Held(&released)))
            .await,
        Err(StoreError::Busy)
    ));
    assert_eq!(released.get(), 1);
    store
        .finish_message(
            carol,
            answer.id,
            "Teal.",
            "",
            &MessageOutcome {
                status: Some(MessageStatus::Complete),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let extra = new_conversation(carol).await;
    new_conversation(carol).await;
    assert!(matches!(
        store.redeem_link_code(&code, by, true).await,
        Err(StoreError::TooManyConversations(3))
    ));
    assert_eq!(
        (
            rows_in(&path, "users").await,
            rows_in(&path, "login_sessions").await,
        ),
        before
    );
    assert_eq!(store.list_conversations(carol).await.unwrap().len(), 3);
    store.delete_conversation(carol, extra.id).await.unwrap();

    // The server's hold, called once the code is good and the conversations would move:
    // its refusal changes nothing either, and a bad code is told as such before it.
    let holds = std::cell::Cell::new(0);
    let refuse = |u| {
        holds.set(holds.get() + 1);
        assert_eq!(u, carol);
        Err::<(), _>(StoreError::Busy)
    };
    assert!(matches!(
        store
            .redeem_link_code_holding("nope", by, true, refuse)
            .await,
        Err(StoreError::BadLinkCode)
    ));
    assert!(matches!(
        store
            .redeem_link_code_holding(&code, by, false, refuse)
            .await,
        Err(StoreError::WouldHide(2))
    ));
    assert_eq!(holds.get(), 0);
    assert!(matches!(
        store
            .redeem_link_code_holding(&code, by, true, refuse)
            .await,
        Err(StoreError::Busy)
    ));
    assert_eq!(holds.get(), 1);
    assert_eq!(store.list_conversations(carol).await.unwrap().len(), 2);

    // Merged: Carol's conversations are Alice's; this browser's old login went, and her
    // phone stays signed in as Carol, without them.
    let (user, _) = store.redeem_link_code(&code, by, true).await.unwrap();
    assert_eq!(user, alice);
    assert_eq!(store.list_conversations(alice).await.unwrap().len(), 3);
    assert_eq!(
        store.conversation(alice, mine.id).await.unwrap().id,
        mine.id
    );
    assert!(matches!(
        store.conversation(carol, mine.id).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.user_for_token(&carols_browser).await.unwrap(), None);
    assert_eq!(
        store.user_for_token(&carols_phone).await.unwrap(),
        Some(carol)
    );
    assert!(store.list_conversations(carol).await.unwrap().is_empty());
    // A tab of this browser still open as Carol creates nothing for her any more (it would
    // land where this browser no longer looks); her phone still does.
    let settings = Settings::default();
    assert!(matches!(
        store
            .create_conversation_for(Some(&carols_browser), carol, "late", "", &settings, false)
            .await,
        Err(StoreError::SignedOut)
    ));
    assert!(store.list_conversations(carol).await.unwrap().is_empty());
    let phones = store
        .create_conversation_for(Some(&carols_phone), carol, "", "", &settings, false)
        .await
        .unwrap();
    store.delete_conversation(carol, phones.id).await.unwrap();

    // A code ten minutes old is no code.
    let code = store.create_link_code(alice).await.unwrap();
    let url = format!("sqlite://{}", path.display());
    let mut db = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    sqlx::query("UPDATE link_codes SET expires_at = expires_at - ?")
        .bind(smolchat::store::LINK_CODE_TTL_MS)
        .execute(&mut db)
        .await
        .unwrap();
    assert!(matches!(
        store.redeem_link_code(&code, None, false).await,
        Err(StoreError::BadLinkCode)
    ));

    // A user signed in on as many browsers as allowed signs in on no more, and signing the
    // others out keeps only the caller's login.
    let logins: i64 = rows_in(&path, "login_sessions").await;
    let alices = logins as usize - 1; // Carol's phone is the other
    for _ in alices..smolchat::store::MAX_LOGINS {
        store.create_login(alice).await.unwrap();
    }
    let code = store.create_link_code(alice).await.unwrap();
    assert!(matches!(
        store.redeem_link_code(&code, None, false).await,
        Err(StoreError::TooManyLogins(_))
    ));
    assert_eq!(
        store.sign_out_others(alice, &token).await.unwrap() as usize,
        smolchat::store::MAX_LOGINS - 1
    );
    assert_eq!(store.user_for_token(&token).await.unwrap(), Some(alice));
    assert_eq!(
        rows_in(&path, "link_codes").await,
        0,
        "unused codes went too"
    );
    assert_eq!(
        store.user_for_token(&carols_phone).await.unwrap(),
        Some(carol)
    );
}

#[tokio::test]
async fn conversations_come_in_pages_that_neither_skip_nor_repeat() {
    let path = db_path("pages");
    let store = Store::open(&path).await.unwrap();
    let alice = store.create_user().await.unwrap();
    let bob = store.create_user().await.unwrap();
    for i in 0..7 {
        store
            .create_conversation(alice, &format!("c{i}"), "", &Settings::default(), false)
            .await
            .unwrap();
    }
    // Four of them changed at the same moment: the id breaks the tie, across page ends too.
    let mut db = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("UPDATE conversations SET updated_at = 1 WHERE title IN ('c1', 'c2', 'c4', 'c6')")
        .execute(&mut db)
        .await
        .unwrap();
    store
        .create_conversation(bob, "bob's", "", &Settings::default(), false)
        .await
        .unwrap();
    let all = store.list_conversations(alice).await.unwrap();
    assert_eq!(all.len(), 7);
    assert_eq!(all.iter().filter(|c| c.updated_at == 1).count(), 4);
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = store.conversations_page(alice, after, 3).await.unwrap();
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        after = Some(ListCursor::after(last));
        paged.extend(page);
    }
    assert_eq!(paged, all);
    // A cursor is a place in the order, not a key: it shows Bob nothing of Alice's.
    let cursor = ListCursor::after(&all[0]);
    let theirs = store
        .conversations_page(bob, Some(cursor), 10)
        .await
        .unwrap();
    assert!(theirs.iter().all(|c| c.title == "bob's"), "{theirs:?}");
    assert_eq!(cursor.to_string().parse::<ListCursor>(), Ok(cursor));
    for bad in ["", "12", "x_y", "12_not-a-uuid"] {
        assert!(bad.parse::<ListCursor>().is_err(), "{bad}");
    }
}

#[tokio::test]
async fn a_backup_copies_a_database_in_use_and_leaves_it_as_it_was() {
    let path = db_path("backup");
    let store = Store::open(&path).await.unwrap();
    let alice = store.create_user().await.unwrap();
    let c = store
        .create_conversation(alice, "kept", "", &Settings::default(), false)
        .await
        .unwrap();
    let (q, a) = answering(&store, alice, c.id, "hello", "Hi th").await;
    let out = path.with_file_name("copy.db");
    // While `store` has it open and an answer is being written.
    Store::backup(&path, &out).await.unwrap();
    assert_eq!(
        store.message(alice, a.id).await.unwrap().status,
        MessageStatus::Streaming,
        "the database in use is left alone"
    );
    let size = std::fs::metadata(&out).unwrap().len();
    let again = Store::backup(&path, &out).await;
    assert!(
        matches!(&again, Err(BackupError::Exists(p)) if *p == out),
        "{again:?}"
    );
    assert_eq!(
        std::fs::metadata(&out).unwrap().len(),
        size,
        "the copy is left as it was"
    );
    let nowhere = path.with_file_name("x.db");
    let missing = Store::backup(&path.with_file_name("none.db"), &nowhere).await;
    assert!(
        matches!(missing, Err(BackupError::NoDatabase(_))),
        "{missing:?}"
    );
    assert!(!nowhere.exists());
    // Nothing half-written is left beside the copy.
    assert!(!path.with_file_name("copy.db.partial").exists());

    let copy = Store::open(&out).await.unwrap();
    assert_eq!(
        copy.list_conversations(alice).await.unwrap()[0].title,
        "kept"
    );
    let m = copy.message(alice, a.id).await.unwrap();
    assert_eq!(
        (m.status, m.content.as_str()),
        (MessageStatus::Interrupted, "Hi th")
    );
    assert_eq!(copy.message(alice, q.id).await.unwrap().content, "hello");
}
