//! The bus against a real RabbitMQ, each test under names of its own.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use parley_core::{ChatEvent, Delivery, DeliveryBus, Dispatch, Signal};
use parley_proto::{internal as ipb, pb};
use prost::Message as _;

use crate::*;

fn test_config() -> AmqpConfig {
    AmqpConfig {
        url: std::env::var("PARLEY_TEST_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
        prefix: parley_core::testing::unique_name("parley-t"),
    }
}

fn delivery(seq: u64, users: &[&str]) -> Delivery {
    Delivery {
        message: Arc::new(pb::Message {
            msg_id: seq,
            seq,
            content: Some(pb::Content::text("hi")),
            ..Default::default()
        }),
        recipients: users.iter().map(|u| ((*u).to_owned(), seq)).collect(),
    }
}

async fn until(what: &str, f: impl Fn() -> bool) {
    for _ in 0..600 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn deliveries_reach_only_their_gateway_and_events_their_exchange() {
    let config = test_config();
    let mut g1 = consume(config.clone(), "g1", 16);
    let mut g2 = consume(config.clone(), "g2", 16);
    until("consumers", || {
        g1.status.connected() && g2.status.connected()
    })
    .await;

    // A push-notification service binds its own queue to the events.
    let (conn, channel) = connect(&config.url, "test").await.unwrap();
    let push_queue = format!("{}.push", config.prefix);
    channel
        .queue_declare(
            push_queue.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            push_queue.as_str().into(),
            config.events().into(),
            "message.*".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut push = channel
        .basic_consume(
            push_queue.as_str().into(),
            "push".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();

    let bus = AmqpBus::start(config.clone());
    bus.publish(
        "g1",
        vec![delivery(1, &["ann"]), delivery(2, &["ann", "bo"])],
    )
    .await
    .unwrap();
    bus.publish("g2", vec![delivery(3, &["cy"])]).await.unwrap();
    bus.events(vec![
        ChatEvent::OfflineMessage {
            user: "dee".into(),
            inbox_seq: 7,
            message: delivery(4, &[]).message,
        },
        ChatEvent::OfflineMessage {
            user: "eve".into(),
            inbox_seq: 2,
            message: delivery(4, &[]).message,
        },
    ])
    .await
    .unwrap();

    let batch = messages(g1.deliveries.recv()).await;
    assert_eq!(batch.len(), 2);
    assert_eq!(
        batch[1].recipients,
        vec![("ann".into(), 2), ("bo".into(), 2)]
    );
    assert_eq!(
        batch[1].message.content.as_ref().unwrap().as_text(),
        Some("hi")
    );
    let batch = messages(g2.deliveries.recv()).await;
    assert_eq!(batch[0].message.seq, 3);
    assert!(g1.deliveries.try_recv().is_err(), "g1 got only its own");

    // Signals: to one gateway's users, or to every gateway.
    let receipt = |seq| {
        Arc::new(pb::ServerFrame::new(
            0,
            pb::server_frame::Body::ReadReceipt(pb::ReadReceipt {
                conversation_id: 9,
                user: "bo".into(),
                seq,
                read_at_ms: 1,
            }),
        ))
    };
    let to = |users: &[&str], seq| Signal {
        users: users.iter().map(|u| (*u).to_owned()).collect(),
        frame: receipt(seq),
    };
    bus.signal(Some("g2"), vec![to(&["cy"], 1)]).await.unwrap();
    bus.signal(None, vec![to(&["ann", "cy"], 2)]).await.unwrap();
    let got = signals(g2.deliveries.recv()).await;
    assert_eq!(
        (got[0].users.as_slice(), &got[0].frame),
        (&["cy".to_owned()][..], &receipt(1))
    );
    for feed in [&mut g1, &mut g2] {
        let got = signals(feed.deliveries.recv()).await;
        assert_eq!(got[0].users, vec!["ann".to_owned(), "cy".to_owned()]);
        assert_eq!(got[0].frame, receipt(2));
    }

    // A device of g1 logged in again on g2: g1 hears of it, and only g1.
    let newer = parley_core::Session::new("ann", "phone", "g2", 42);
    bus.replaced("g1", &newer).await.unwrap();
    let notice = tokio::time::timeout(Duration::from_secs(10), g1.replaced.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(notice, newer);
    assert!(g1.deliveries.try_recv().is_err(), "a notice is no delivery");
    assert!(g2.replaced.try_recv().is_err());

    let event = tokio::time::timeout(Duration::from_secs(10), push.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.routing_key.as_str(), OFFLINE_MESSAGE_KEY);
    let offline = ipb::OfflineMessages::decode(event.data.as_slice()).unwrap();
    let cues: Vec<(&str, u64)> = offline
        .items
        .iter()
        .map(|o| (o.user_id.as_str(), o.inbox_seq))
        .collect();
    assert_eq!(
        cues,
        vec![("dee", 7), ("eve", 2)],
        "one publish for the batch"
    );
    assert!(bus.status().connected());
    assert_eq!(bus.status().dropped(), 0);

    drop((g1, g2, bus));
    conn.close(200, "bye".into()).await.unwrap();
    delete_topology(&config, &["g1", "g2"]).await.unwrap();
}

/// The next messages a gateway's feed hands over.
async fn messages(next: impl Future<Output = Option<Dispatch>>) -> Vec<Delivery> {
    match tokio::time::timeout(Duration::from_secs(10), next).await {
        Ok(Some(Dispatch::Messages(m))) => m,
        other => panic!("expected messages, got {other:?}"),
    }
}

/// The next signals a gateway's feed hands over.
async fn signals(next: impl Future<Output = Option<Dispatch>>) -> Vec<Signal> {
    match tokio::time::timeout(Duration::from_secs(10), next).await {
        Ok(Some(Dispatch::Signals(s))) => s,
        other => panic!("expected signals, got {other:?}"),
    }
}
