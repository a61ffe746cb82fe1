//! Logits and input gradients of the f32 and the stored-weight paths on the same prompts:
//! `cargo run --release --example stored_parity`.
use engram::model::{load_with, Batch, HookPoint, Trace, WeightMode};
fn main() -> anyhow::Result<()> {
    let dev = candle_core::Device::Cpu;
    let f = load_with(None, &dev, WeightMode::F32)?;
    let s = load_with(None, &dev, WeightMode::Stored)?;
    let tok = f.tok()?;
    for p in [
        "The Eiffel Tower is located in the city of",
        "Paris is",
        "x",
    ] {
        let ids = tok.encode(p)?;
        let a = f.forward(&Batch::single(&ids), &mut Trace::new())?;
        let b = s.forward(&Batch::single(&ids), &mut Trace::new())?;
        let d = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        println!("{p:?}: {} tokens, max |logit diff| {d:e}", ids.len());
        // Differentiable pass from layer 5's residual.
        let mut cap = Trace::new();
        cap.capture(HookPoint::ResidPre(5));
        f.forward(&Batch::single(&ids), &mut cap)?;
        let r = cap.take(HookPoint::ResidPre(5)).unwrap();
        let mut out = vec![];
        for m in [&f, &s] {
            let v = candle_core::Var::from_tensor(&r)?;
            let y = m.forward_from(
                5,
                v.as_tensor(),
                None,
                None,
                &mut Trace::new().differentiable(),
                false,
            )?;
            let loss = y.sqr()?.mean_all()?;
            let g = loss.backward()?;
            out.push((y, g.get(v.as_tensor()).unwrap().clone()));
        }
        let dy = (&out[0].0 - &out[1].0)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        let dg = (&out[0].1 - &out[1].1)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        println!("   differentiable: max |logit diff| {dy:e}, max |grad diff| {dg:e}");
    }
    Ok(())
}
