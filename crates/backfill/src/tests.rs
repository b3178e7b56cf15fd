use lsync_protocol::{Epoch, LibraryId};
use proptest::prelude::*;

use super::*;

fn device(byte: u8) -> DeviceId {
    DeviceId::from_bytes([byte; 16])
}

fn key(n: u8) -> Uuid {
    Uuid::from_bytes([n; 16])
}

fn time(ms: u64) -> HlcTime {
    HlcTime::from_u64(ms << 16)
}

fn models() -> Models {
    Models { shared: vec!["tags".into()], state: vec!["locations".into(), "entries".into()] }
}

fn watermarks(
    peer: DeviceId,
    shared: &[(DeviceId, u64)],
    state: &[(DeviceId, &str, u64)],
) -> Watermarks {
    Watermarks {
        library: LibraryId(Uuid::from_bytes([9; 16])),
        device: peer,
        epoch: Epoch(1),
        shared: shared
            .iter()
            .map(|(origin, seq)| OriginSeq { origin: *origin, seq: *seq })
            .collect(),
        state: state
            .iter()
            .map(|(owner, model, ms)| StateMark {
                owner: *owner,
                model: (*model).into(),
                version: time(*ms),
            })
            .collect(),
        ready: true,
        resync: false,
        collected: Vec::new(),
        incarnation: None,
        seen: None,
        wall_ms: None,
    }
}

/// A joining device planned from peer 1, which holds tags of origin 2 and entries and
/// locations of owner 2.
fn planned() -> Backfill {
    let mut backfill = Backfill::new(Checkpoint::uninitialized());
    let theirs = watermarks(
        device(1),
        &[(device(2), 10)],
        &[(device(2), "entries", 500), (device(2), "locations", 400)],
    );
    backfill.planned(device(1), &theirs, &models());
    backfill
}

#[test]
fn a_founding_copy_is_ready_and_idle() {
    let backfill = Backfill::new(Checkpoint::ready());
    assert_eq!(backfill.phase(), Phase::Ready);
    assert!(backfill.is_ready());
    assert_eq!(backfill.next(), Command::Idle);
}

#[test]
fn uninitialized_asks_for_a_plan() {
    let backfill = Backfill::new(Checkpoint::uninitialized());
    assert_eq!(backfill.phase(), Phase::Uninitialized);
    assert_eq!(backfill.next(), Command::Plan);
}

#[test]
fn planning_orders_shared_first_then_models_parents_first() {
    let backfill = planned();
    assert_eq!(backfill.phase(), Phase::Backfilling);
    let names: Vec<String> = backfill.checkpoint().steps.iter().map(Step::name).collect();
    let owner = device(2);
    assert_eq!(
        names,
        vec!["tags".to_owned(), format!("locations@{owner}"), format!("entries@{owner}")]
    );
    assert_eq!(
        backfill.next(),
        Command::Fetch {
            peer: device(1),
            step: StepKind::Shared { model: "tags".into() },
            after: None
        }
    );
}

#[test]
fn planning_with_nothing_to_fetch_goes_straight_to_catching_up() {
    let mut backfill = Backfill::new(Checkpoint::uninitialized());
    backfill.planned(device(1), &watermarks(device(1), &[], &[]), &Models::default());
    assert_eq!(backfill.phase(), Phase::CatchingUp);
    assert_eq!(backfill.next(), Command::CatchUp { peer: Some(device(1)) });
}

#[test]
fn pages_advance_the_cursor_and_marks_rise_only_when_a_step_ends() {
    let mut backfill = planned();
    let outcome = backfill.page(&[key(1), key(2)], true, 3, None, 10);
    assert!(!outcome.step_done && outcome.raise_shared.is_empty());
    assert_eq!(backfill.checkpoint().cursor, Some(key(2)));
    // The last page of the only shared step raises the shared marks.
    let outcome = backfill.page(&[key(3)], false, 3, None, 20);
    assert!(outcome.step_done);
    assert_eq!(outcome.raise_shared, vec![OriginSeq { origin: device(2), seq: 10 }]);
    assert_eq!(backfill.checkpoint().current, 1);
    assert_eq!(backfill.checkpoint().cursor, None);
    // locations: one empty page ends it and raises its mark.
    let outcome = backfill.page(&[], false, 0, None, 30);
    assert_eq!(
        outcome.raise_state,
        vec![StateMark { owner: device(2), model: "locations".into(), version: time(400) }]
    );
    // entries: the last step; its end moves to CatchingUp.
    let outcome = backfill.page(&[key(7)], false, 1, None, 40);
    assert_eq!(outcome.raise_state[0].version, time(500));
    assert_eq!(backfill.phase(), Phase::CatchingUp);
    backfill.caught_up();
    assert_eq!(backfill.phase(), Phase::Ready);
    assert_eq!(backfill.checkpoint().completed, 1);
    assert_eq!(backfill.next(), Command::Idle);
}

#[test]
fn a_restart_resumes_from_the_checkpoint() {
    let mut backfill = planned();
    backfill.page(&[key(1), key(2)], true, 10, None, 10);
    let stored = backfill.checkpoint().clone();
    let resumed = Backfill::new(stored);
    assert_eq!(
        resumed.next(),
        Command::Fetch {
            peer: device(1),
            step: StepKind::Shared { model: "tags".into() },
            after: Some(key(2))
        }
    );
    assert_eq!(resumed.progress(10).done, 2);
}

#[test]
fn losing_the_serving_peer_requires_a_rebase_to_the_lower_marks() {
    let mut backfill = planned();
    backfill.page(&[key(1)], true, 10, None, 10);
    backfill.peer_lost(device(1));
    assert_eq!(backfill.next(), Command::Rebase);
    // Peer 3 holds less of origin 2 and of entries, and nothing of locations.
    let theirs = watermarks(device(3), &[(device(2), 7)], &[(device(2), "entries", 450)]);
    backfill.rebased(device(3), &theirs);
    assert_eq!(
        backfill.next(),
        Command::Fetch {
            peer: device(3),
            step: StepKind::Shared { model: "tags".into() },
            after: Some(key(1))
        }
    );
    let checkpoint = backfill.checkpoint();
    assert_eq!(checkpoint.shared_marks, vec![OriginSeq { origin: device(2), seq: 7 }]);
    assert_eq!(
        checkpoint.state_marks,
        vec![StateMark { owner: device(2), model: "entries".into(), version: time(450) }]
    );
}

#[test]
fn losing_another_peer_changes_nothing() {
    let mut backfill = planned();
    backfill.peer_lost(device(5));
    assert!(matches!(backfill.next(), Command::Fetch { peer, .. } if peer == device(1)));
}

/// Pauses `backfill` (in `phase`, about to do `command`) and resumes it: while paused it reports
/// `paused_phase`, does nothing and keeps its checkpoint as it was; resumed, it is back in `phase`
/// and does `command` again, from the same checkpoint.
fn pause_and_resume(mut backfill: Backfill, phase: Phase, paused_phase: Phase, command: Command) {
    assert_eq!(backfill.phase(), phase);
    assert_eq!(backfill.next(), command);
    let before = backfill.checkpoint().clone();
    backfill.pause();
    assert_eq!(backfill.phase(), paused_phase);
    assert_eq!(backfill.next(), Command::Idle, "nothing is done while paused");
    assert_eq!(backfill.checkpoint(), &before, "pausing changes no checkpoint (nor is persisted)");
    // Pausing twice is pausing.
    backfill.pause();
    assert_eq!(backfill.next(), Command::Idle);
    // A restart while paused resumes from the same checkpoint (the engine pauses it again if
    // sync is still off).
    assert_eq!(Backfill::new(backfill.checkpoint().clone()).next(), command);
    backfill.resume();
    assert_eq!(backfill.phase(), phase);
    assert_eq!(backfill.next(), command, "resuming continues where the pause stopped");
    assert_eq!(backfill.checkpoint(), &before, "resuming changes no checkpoint");
}

#[test]
fn pausing_before_the_plan_stops_planning_and_resuming_plans() {
    let backfill = Backfill::new(Checkpoint::uninitialized());
    pause_and_resume(backfill, Phase::Uninitialized, Phase::Paused, Command::Plan);
}

#[test]
fn pausing_stops_fetching_and_resuming_continues_after_the_cursor() {
    let mut backfill = planned();
    backfill.page(&[key(1), key(2)], true, 10, None, 10);
    let resumed = Command::Fetch {
        peer: device(1),
        step: StepKind::Shared { model: "tags".into() },
        after: Some(key(2)),
    };
    pause_and_resume(backfill, Phase::Backfilling, Phase::Paused, resumed);
}

#[test]
fn pausing_while_the_serving_peer_is_gone_waits_and_resuming_rebases() {
    let mut backfill = planned();
    backfill.page(&[key(1)], true, 10, None, 10);
    backfill.peer_lost(device(1));
    pause_and_resume(backfill, Phase::Backfilling, Phase::Paused, Command::Rebase);
}

#[test]
fn pausing_while_catching_up_stops_it_and_resuming_catches_up() {
    let mut backfill = planned();
    backfill.page(&[key(1)], false, 1, None, 10);
    backfill.page(&[], false, 0, None, 20);
    backfill.page(&[key(7)], false, 1, None, 30);
    let resumed = Command::CatchUp { peer: Some(device(1)) };
    pause_and_resume(backfill, Phase::CatchingUp, Phase::Paused, resumed);
}

#[test]
fn a_ready_copy_stays_ready_when_paused() {
    let backfill = Backfill::new(Checkpoint::ready());
    pause_and_resume(backfill.clone(), Phase::Ready, Phase::Ready, Command::Idle);
    let mut paused = backfill;
    paused.pause();
    assert!(paused.is_ready(), "a paused complete copy still applies what it is given");
}

#[test]
fn a_resync_of_a_paused_ready_copy_waits_for_resume() {
    let mut backfill = Backfill::new(Checkpoint::ready());
    backfill.pause();
    backfill.resync(Scope::Everything, true);
    assert_eq!(backfill.phase(), Phase::Paused, "not ready any more, and paused");
    assert_eq!(backfill.next(), Command::Idle);
    backfill.resume();
    assert_eq!(backfill.phase(), Phase::Uninitialized);
    assert_eq!(backfill.next(), Command::Plan);
}

#[test]
fn results_that_arrive_while_paused_are_kept_and_nothing_follows_until_resume() {
    // A plan asked for before the pause.
    let mut backfill = Backfill::new(Checkpoint::uninitialized());
    backfill.pause();
    let theirs = watermarks(device(1), &[(device(2), 10)], &[(device(2), "entries", 500)]);
    backfill.planned(device(1), &theirs, &models());
    assert_eq!(backfill.checkpoint().phase, Phase::Backfilling);
    assert_eq!(backfill.phase(), Phase::Paused);
    assert_eq!(backfill.next(), Command::Idle);
    // A page fetched before the pause.
    backfill.page(&[key(1)], true, 10, None, 10);
    assert_eq!(backfill.checkpoint().cursor, Some(key(1)));
    assert_eq!(backfill.next(), Command::Idle);
    backfill.resume();
    assert_eq!(
        backfill.next(),
        Command::Fetch {
            peer: device(1),
            step: StepKind::Shared { model: "tags".into() },
            after: Some(key(1))
        }
    );
}

#[test]
fn a_shared_resync_plans_only_shared_models() {
    let mut backfill = Backfill::new(Checkpoint::ready());
    backfill.resync(Scope::Shared, false);
    assert_eq!(backfill.next(), Command::Plan);
    let theirs = watermarks(device(1), &[(device(2), 10)], &[(device(2), "entries", 500)]);
    backfill.planned(device(1), &theirs, &models());
    let names: Vec<String> = backfill.checkpoint().steps.iter().map(Step::name).collect();
    assert_eq!(names, vec!["tags".to_owned()]);
}

#[test]
fn a_full_resync_deletes_what_the_peer_no_longer_holds_range_by_range() {
    let mut backfill = Backfill::new(Checkpoint::ready());
    backfill.resync(Scope::Everything, true);
    let theirs = watermarks(device(1), &[], &[(device(2), "entries", 500)]);
    backfill.planned(device(1), &theirs, &Models { shared: vec![], state: vec!["entries".into()] });
    let outcome = backfill.page(&[key(1), key(4)], true, 5, None, 1);
    assert_eq!(outcome.delete_missing, Some((None, Some(key(4)))));
    let outcome = backfill.page(&[key(6)], false, 5, None, 2);
    assert_eq!(outcome.delete_missing, Some((Some(key(4)), None)));
}

/// Devices that all resync at once (each fell behind another's retention) must still find a
/// source, and so must a joiner arriving then: a resyncing copy that was complete serves until
/// its resync ends, through a restart — unless the resync deletes what the peer no longer holds
/// (a copy restored from an old file holds rows deleted since). A joiner, or a re-created
/// device, never serves before its first backfill ends, not even when asked to resync.
#[test]
fn a_resyncing_copy_that_was_complete_serves_backfills_and_a_joiner_does_not() {
    for (scope, delete_missing) in
        [(Scope::Shared, false), (Scope::Everything, false), (Scope::Everything, true)]
    {
        let mut backfill = Backfill::new(Checkpoint::ready());
        backfill.resync(scope, delete_missing);
        assert!(!backfill.is_ready());
        assert_eq!(backfill.serves(), !delete_missing, "{scope:?}");
        let theirs = watermarks(device(1), &[(device(2), 10)], &[(device(2), "entries", 500)]);
        backfill.planned(device(1), &theirs, &models());
        backfill.page(&[key(1)], true, 10, None, 10);
        let restarted = Backfill::new(backfill.checkpoint().clone());
        assert_eq!(restarted.serves(), !delete_missing, "{scope:?} after a restart");
    }
    let mut joiner = Backfill::new(Checkpoint::uninitialized());
    assert!(!joiner.serves());
    joiner.resync(Scope::Everything, true);
    assert!(!joiner.serves());
    joiner.resync(Scope::Shared, false);
    assert!(!joiner.serves());
}

#[test]
fn a_resync_during_a_larger_backfill_changes_nothing() {
    let mut backfill = planned();
    backfill.page(&[key(1)], true, 10, None, 10);
    let before = backfill.checkpoint().clone();
    backfill.resync(Scope::Shared, false);
    assert_eq!(backfill.checkpoint(), &before);
}

#[test]
fn progress_reports_rate_and_eta() {
    let mut backfill = planned();
    backfill.page(&[key(1)], true, 101, None, 1_000);
    backfill.page(&(2..=51).map(key).collect::<Vec<_>>(), true, 101, None, 2_000);
    let progress = backfill.progress(2_000);
    assert_eq!(progress.done, 51);
    assert_eq!(progress.total, 101);
    // 51 rows applied in the second since this run's first page arrived; 50 left.
    assert!((progress.rate - 51.0).abs() < 1e-9, "{}", progress.rate);
    assert!((progress.eta_secs.unwrap() - 50.0 / 51.0).abs() < 1e-9);
}

#[test]
fn the_peer_with_the_shortest_round_trip_serves() {
    let candidate = |byte, rtt_us, ready| Candidate {
        device: device(byte),
        rtt_us,
        online: true,
        ready,
        failed: false,
    };
    let candidates = [
        candidate(1, Some(900), Some(true)),
        candidate(2, Some(100), Some(false)),
        candidate(3, Some(300), None),
        candidate(4, None, Some(true)),
    ];
    assert_eq!(choose_peer(&candidates, None), Some(device(3)), "2 is not ready");
    let mut failed = candidates;
    failed[2].failed = true;
    assert_eq!(choose_peer(&failed, None), Some(device(1)));
    let offline: Vec<Candidate> =
        candidates.iter().map(|c| Candidate { online: false, ..*c }).collect();
    assert_eq!(choose_peer(&offline, None), None);
}

/// A resync names the peer that showed the need (it holds what this copy lacks): that peer
/// serves if it can, however slow; one that cannot is passed over as ever.
#[test]
fn a_resync_is_served_by_the_peer_that_showed_the_need_if_it_can() {
    let candidate = |byte, rtt_us, ready, online| Candidate {
        device: device(byte),
        rtt_us,
        online,
        ready,
        failed: false,
    };
    let candidates = [
        candidate(1, Some(100), Some(true), true),
        candidate(2, Some(900), Some(true), true),
        candidate(3, Some(50), Some(false), true),
        candidate(4, Some(10), Some(true), false),
    ];
    assert_eq!(choose_peer(&candidates, Some(device(2))), Some(device(2)));
    assert_eq!(choose_peer(&candidates, Some(device(3))), Some(device(1)), "3 cannot serve");
    assert_eq!(choose_peer(&candidates, Some(device(4))), Some(device(1)), "4 is offline");
    assert_eq!(choose_peer(&candidates, Some(device(9))), Some(device(1)), "9 is unknown");
}

proptest! {
    /// Whatever the page sizes and restarts, every key is applied exactly once, in order, and
    /// the machine ends ready with every step's mark raised once.
    #[test]
    fn paging_with_restarts_applies_every_key_once(
        sizes in prop::collection::vec(1usize..5, 1..4),
        page in 1usize..4,
        restarts in prop::collection::vec(any::<bool>(), 0..40),
    ) {
        let owner = device(2);
        let state: Vec<(DeviceId, &str, u64)> = vec![(owner, "locations", 10), (owner, "entries", 20)];
        let theirs = watermarks(device(1), &[(owner, 3)], &state);
        let mut backfill = Backfill::new(Checkpoint::uninitialized());
        backfill.planned(device(1), &theirs, &models());
        // The serving side: per step, its keys.
        let held: Vec<Vec<Uuid>> = (0..3)
            .map(|step| (0..sizes[step % sizes.len()]).map(|n| key(u8::try_from(n + 1).unwrap())).collect())
            .collect();
        let mut applied: Vec<Vec<Uuid>> = vec![Vec::new(); 3];
        let mut raised = 0;
        let mut now = 0;
        let mut restarts = restarts.into_iter();
        while let Command::Fetch { step, after, .. } = backfill.next() {
            let index = backfill.checkpoint().current;
            let _ = step;
            let keys: Vec<Uuid> = held[index]
                .iter()
                .filter(|key| after.is_none_or(|after| **key > after))
                .take(page)
                .copied()
                .collect();
            let more = held[index].iter().filter(|key| after.is_none_or(|after| **key > after)).count() > keys.len();
            now += 1;
            let outcome = backfill.page(&keys, more, held[index].len() as u64, None, now);
            applied[index].extend(&keys);
            raised += outcome.raise_state.len() + usize::from(!outcome.raise_shared.is_empty());
            if restarts.next() == Some(true) {
                backfill = Backfill::new(backfill.checkpoint().clone());
            }
        }
        prop_assert_eq!(backfill.next(), Command::CatchUp { peer: Some(device(1)) });
        prop_assert_eq!(applied, held);
        prop_assert_eq!(raised, 3);
        backfill.caught_up();
        prop_assert!(backfill.is_ready());
    }
}

#[test]
fn a_state_step_inherits_the_serving_peers_collected_marks_the_higher_after_a_rebase() {
    let mark = |owner, model: &str, ms| StateMark { owner, model: model.into(), version: time(ms) };
    let mut backfill = Backfill::new(Checkpoint::uninitialized());
    let theirs = Watermarks {
        collected: vec![mark(device(2), "entries", 300)],
        ..watermarks(device(1), &[], &[(device(2), "entries", 500)])
    };
    backfill.planned(device(1), &theirs, &models());
    assert!(backfill.page(&[], false, 0, None, 10).raise_collected.is_empty(), "the shared step");
    // The serving peer goes; the next one forgot more of entries@2.
    backfill.peer_lost(device(1));
    let next = Watermarks {
        collected: vec![mark(device(2), "entries", 400)],
        ..watermarks(device(3), &[], &[(device(2), "entries", 450)])
    };
    backfill.rebased(device(3), &next);
    let outcome = backfill.page(&[key(1)], false, 0, None, 10);
    assert!(outcome.step_done);
    assert_eq!(outcome.raise_state, [mark(device(2), "entries", 450)]);
    assert_eq!(
        outcome.raise_collected,
        [mark(device(2), "entries", 400)],
        "the copy cannot list deletions either peer forgot"
    );
}

#[test]
fn rollbacks_reported_by_other_peers_during_a_rollback_resync_each_chain_one_more() {
    let (source, other, third) = (device(2), device(3), device(4));
    let mut machine = Backfill::new(Checkpoint::ready());
    assert!(!machine.rolled_back_by(other), "no resync runs: the caller starts one");
    machine.resync(Scope::Everything, true);
    let theirs = watermarks(source, &[(device(5), 3)], &[(device(5), "entries", 7)]);
    machine.planned(source, &theirs, &models());
    assert!(!machine.rolled_back_by(source), "the source's own report changes nothing");
    assert!(machine.rolled_back_by(other));
    assert!(!machine.rolled_back_by(other), "already due");
    assert!(machine.rolled_back_by(third));
    assert_eq!(machine.checkpoint().resync_after, vec![other, third]);
    let finish = |machine: &mut Backfill| {
        while let Command::Fetch { .. } = machine.next() {
            machine.page(&[], false, 0, None, 0);
        }
        machine.caught_up();
    };
    // Instead of Ready, a new resync that deletes; the next reporter stays due.
    let completed = machine.checkpoint().completed;
    finish(&mut machine);
    let checkpoint = machine.checkpoint();
    assert_eq!(checkpoint.phase, Phase::Uninitialized);
    assert!(checkpoint.delete_missing && checkpoint.scope == Scope::Everything);
    assert_eq!(checkpoint.completed, completed + 1, "the first resync counts as done");
    assert_eq!(checkpoint.resync_after, vec![third]);
    assert!(!checkpoint.brought_back_own_rows() && !checkpoint.serves());
    machine.planned(other, &theirs, &models());
    finish(&mut machine);
    assert_eq!(machine.checkpoint().resync_after, Vec::<DeviceId>::new());
    machine.planned(third, &theirs, &models());
    finish(&mut machine);
    assert!(machine.is_ready() && machine.checkpoint().brought_back_own_rows());
}

/// `world::a_second_resync_from_a_peer_that_heard_less_does_not_bring_back_rows_the_first_deleted`
/// (the real-mode simulator's `--topology chain --seed 13`): a rollback resync's source held
/// this copy's own rows complete through its marks, and a later rollback resync, chained or
/// started anew, applies them against those marks instead of by its source's word alone.
#[test]
fn a_rollback_resync_leaves_marks_that_later_resyncs_apply_own_rows_against() {
    let (me, first, second) = (device(1), device(2), device(3));
    let finish = |machine: &mut Backfill| {
        while let Command::Fetch { .. } = machine.next() {
            machine.page(&[], false, 0, None, 0);
        }
        machine.caught_up();
    };
    let mut machine = Backfill::new(Checkpoint::ready());
    // A backfill that deletes nothing leaves no such mark.
    machine.resync(Scope::Everything, false);
    let low = watermarks(first, &[], &[(me, "entries", 3)]);
    machine.planned(first, &low, &models());
    finish(&mut machine);
    assert_eq!(machine.checkpoint().own_rows_known_through(me, "entries"), None);

    machine.resync(Scope::Everything, true);
    assert!(machine.rolled_back_by(second));
    let theirs = watermarks(first, &[], &[(me, "entries", 7), (device(5), "entries", 9)]);
    machine.planned(first, &theirs, &models());
    assert_eq!(machine.checkpoint().own_rows_known_through(me, "entries"), None, "not yet");
    finish(&mut machine);
    // The chained resync from `second` keeps what the first one left.
    let checkpoint = machine.checkpoint();
    assert!(checkpoint.delete_missing && checkpoint.phase == Phase::Uninitialized);
    assert_eq!(checkpoint.own_rows_known_through(me, "entries"), Some(time(7)));
    assert_eq!(checkpoint.own_rows_known_through(me, "locations"), None);
    let less = watermarks(second, &[], &[(me, "entries", 5)]);
    machine.planned(second, &less, &models());
    finish(&mut machine);
    assert_eq!(machine.checkpoint().own_rows_known_through(me, "entries"), Some(time(7)));
    // A later rollback resync, started anew, keeps them too, and raises them.
    machine.resync(Scope::Everything, true);
    assert_eq!(machine.checkpoint().own_rows_known_through(me, "entries"), Some(time(7)));
    let more = watermarks(second, &[], &[(me, "entries", 11)]);
    machine.planned(second, &more, &models());
    finish(&mut machine);
    assert_eq!(machine.checkpoint().own_rows_known_through(me, "entries"), Some(time(11)));
}

#[test]
fn a_resync_request_is_stale_covered_chained_or_started() {
    let (source, other) = (device(2), device(3));
    let request = |scope, delete_missing, from, completed| ResyncRequest {
        scope,
        delete_missing,
        from: Some(from),
        completed,
    };
    let ready = Backfill::new(Checkpoint::ready());
    let completed = ready.checkpoint().completed;
    // A ready copy starts what is asked for.
    let ResyncDecision::Start(shared) =
        ready.on_resync_request(&request(Scope::Shared, false, source, completed), false, None)
    else {
        panic!("a shared resync of a ready copy starts");
    };
    assert_eq!(shared.checkpoint().scope, Scope::Shared);
    assert!(!shared.is_ready());
    // Asked again while it has no source yet: covered, and the first asker is preferred.
    let again =
        shared.on_resync_request(&request(Scope::Shared, false, other, completed), false, None);
    assert!(matches!(again, ResyncDecision::Covered { prefer: true }));
    let again = shared.on_resync_request(
        &request(Scope::Shared, false, other, completed),
        false,
        Some(source),
    );
    assert!(matches!(again, ResyncDecision::Covered { prefer: false }));
    // A full resync is larger than a shared one: it replaces it.
    let full = request(Scope::Everything, true, source, completed);
    let ResyncDecision::Start(mut rollback) = shared.on_resync_request(&full, false, None) else {
        panic!("a rollback resync replaces a shared one");
    };
    // Another peer reports the rollback while it runs from the source: one more follows.
    let theirs = watermarks(source, &[(device(5), 3)], &[(device(5), "entries", 7)]);
    rollback.planned(source, &theirs, &models());
    let reported = request(Scope::Everything, true, other, completed);
    let ResyncDecision::Chain(chained) = rollback.on_resync_request(&reported, false, Some(source))
    else {
        panic!("a second reporter chains a resync");
    };
    assert_eq!(chained.checkpoint().resync_after, vec![other]);
    // A need seen before a backfill ended is stale, unless it is a rollback report from a peer
    // that served no resync after the rollback.
    let mut done = Backfill::new(Checkpoint::ready());
    done.resync(Scope::Shared, false);
    done.planned(source, &theirs, &models());
    while let Command::Fetch { .. } = done.next() {
        done.page(&[], false, 0, None, 0);
    }
    done.caught_up();
    assert!(done.is_ready());
    let old = done.checkpoint().completed - 1;
    let stale = done.on_resync_request(&request(Scope::Shared, false, source, old), false, None);
    assert!(matches!(stale, ResyncDecision::Stale));
    let report = request(Scope::Everything, true, other, old);
    assert!(matches!(done.on_resync_request(&report, false, None), ResyncDecision::Start(_)));
    assert!(matches!(done.on_resync_request(&report, true, None), ResyncDecision::Stale));
}

#[test]
fn only_a_finished_full_backfill_that_brought_own_rows_back_asks_for_a_barrier() {
    let finished = |phase, scope, delete_missing, complete_before| {
        let mut checkpoint = Checkpoint::with_phase(phase, scope, delete_missing);
        checkpoint.complete_before = complete_before;
        checkpoint.brought_back_own_rows()
    };
    // A restored copy's resync, a re-created device's (or a joiner's) first backfill.
    assert!(finished(Phase::Ready, Scope::Everything, true, true));
    assert!(finished(Phase::Ready, Scope::Everything, false, false));
    // A complete copy resyncing what it fell behind on keeps its own rows.
    assert!(!finished(Phase::Ready, Scope::Everything, false, true));
    assert!(!finished(Phase::Ready, Scope::Shared, false, true));
    // Not before it ends.
    assert!(!finished(Phase::Uninitialized, Scope::Everything, true, true));
}

#[test]
fn the_own_rows_barrier_is_due_once_every_peer_confirmed_and_a_rollback_cancels_it() {
    let (a, b) = (device(2), device(3));
    let mut barrier = OwnRowsBarrier::default();
    assert!(!barrier.confirmed(a), "nothing waits: nothing is due");
    assert!(barrier.start([]), "no paired peer: due at once");
    assert!(barrier.waiting().is_none());
    assert!(!barrier.start([a, b]));
    assert!(!barrier.confirmed(a));
    assert!(!barrier.confirmed(a), "a repeat confirms nothing more");
    assert!(barrier.confirmed(b), "the last one makes it due");
    assert!(barrier.waiting().is_none() && !barrier.confirmed(b), "due once");
    assert!(!barrier.start([a, b]));
    barrier.cancel();
    assert!(!barrier.confirmed(a) && !barrier.confirmed(b), "cancelled by a rollback");
}
